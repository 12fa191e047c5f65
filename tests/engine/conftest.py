"""Fixtures of the engine tests."""

import os
import time

import pytest

from rlhf_engine.procs import descendants


@pytest.fixture
def assert_no_new_children():
    """A check that the test left no process behind: descendants of this process that were not
    there when the test started (a session fixture's shared vLLM engine is not the test's)."""
    before = set(descendants(os.getpid()))

    def check() -> None:
        deadline = time.monotonic() + 10
        while set(descendants(os.getpid())) - before and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(set(descendants(os.getpid())) - before)
        assert not left, f"processes left behind: {left}"

    return check
