"""Adapter-only weight sync into a real CPU vLLM engine: each version a new LoRA adapter. The checks run in one
child process with the engine in process (`tests/rollout/lora_checks.py`: one import of vLLM and no engine
processes for all of them; in process, vLLM takes over torch.set_num_threads, so not in the test process)."""

from __future__ import annotations

import pytest

from tests.helpers.rollout import run_checks

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def lora_checks(tiny_model_dir, tmp_path_factory) -> str:
    """The output of `python -m tests.rollout.lora_checks`: a line `NAME: ok` per check that held."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    return run_checks("tests.rollout.lora_checks", tiny_model_dir, str(tmp_path_factory.mktemp("lora_checks")))


def check(output: str, name: str) -> None:
    assert f"\n{name}: ok\n" in f"\n{output}", output[-5000:]


def test_adapter_sync_matches_transformers_with_the_same_adapters(lora_checks):
    check(lora_checks, "sync")


def test_wrong_adapters_are_rejected_before_anything_is_applied(lora_checks):
    check(lora_checks, "rejected")


def test_closing_the_generator_deletes_its_adapter_folders(lora_checks):
    check(lora_checks, "cleanup")


def test_adapters_vllm_does_not_serve_like_peft_name_the_sync_switch(lora_checks):
    # vLLM 0.32 takes an lm_head adapter without an error, but its log-probs were 1.8 nats from peft's:
    # the generator refuses it at start and points at the merged sync
    check(lora_checks, "lm_head")
