"""Fixtures of the engine tests."""

import json
import os

import pytest

from rlhf_engine.common.procs import descendants
from rlhf_engine.data import synthetic
from rlhf_engine.models.tiny import make_tiny_model_dir
from tests.helpers.waiting import wait_until


@pytest.fixture
def assert_no_new_children():
    """A check that the test left no process behind: descendants of this process that were not
    there when the test started (a session fixture's shared vLLM engine is not the test's)."""
    before = set(descendants(os.getpid()))

    def new() -> set[int]:
        # multiprocessing's resource tracker (started once per process by the first vLLM engine made in this
        # process) is this process's own helper: it ends with it
        return {pid for pid in set(descendants(os.getpid())) - before if not _is_resource_tracker(pid)}

    def check() -> None:
        wait_until(lambda: not new(), 10, interval_s=0.1, message=lambda: f"no process left behind ({sorted(new())})")

    return check


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("engine") / "policy")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(64, seed=0)))
    return path
