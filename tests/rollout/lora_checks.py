"""Adapter-only weight sync into an in-process vLLM engine, checked against transformers + peft; run by
`test_vllm_lora.py` as `python -m tests.rollout.lora_checks MODEL_DIR STAGING_DIR` (one process, one import of
vLLM, for every check). Each check prints `NAME: ok`, or `NAME: failed` and its traceback, and the next one runs.

- sync: each version a new LoRA adapter; vLLM's sampler log-probs under it equal transformers + peft with the
  same adapter (v0: the all-zero adapter = the base), and one adapter is loaded at a time.
- rejected: adapters with a wrong name or shape are refused before anything is applied (same version, same
  adapter, no folder of the rejected update, the same greedy samples after).
- cleanup: closing the generator deletes its adapter folders.
- lm_head: a layout vLLM 0.32 takes without an error but does not serve as peft does (an `lm_head` adapter: its
  log-probs were 1.8 nats from peft's) is refused at start, pointing at the merged sync, leaving no folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.vllm_backend import VLLMGenerator
from rlhf_engine.transport.weights import adapter_specs
from tests.helpers.rollout import peft_reference, prompts, random_adapters, reference_logprobs
from tests.rollout.conftest import MAX_MODEL_LEN

LORA = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")
"""r = 4 runs with max_lora_rank 8 (the smallest rank vLLM accepts above it); all-linear packs q/k/v and gate/up."""


def max_diff(model, completions) -> float:
    return max((reference_logprobs(model, c) - c.behaviour_logp).abs().max().item() for c in completions)


def check_sync(gen: VLLMGenerator, model_dir: str, tokenizer) -> None:
    batch, sampling = prompts(tokenizer, 5), SamplingConfig(max_new_tokens=20, ignore_eos=True)
    base = peft_reference(model_dir, LORA)
    assert max_diff(base, gen.generate(batch, sampling=sampling)) <= 1e-4  # v0: the all-zero adapter = the base
    specs = adapter_specs(model_dir, LORA)
    for seed in (11, 12):
        adapters = random_adapters(specs, scale=0.1, seed=seed)
        version = gen.version + 1
        assert gen.update_weights(version, adapters)
        out = gen.generate(batch, sampling=sampling)
        assert {c.policy_version for c in out} == {version}
        assert gen._adapters.request.lora_name == f"policy-v{version}"
        # vLLM's sampler log-probs under the adapter equal transformers + peft with the same adapter ...
        assert max_diff(peft_reference(model_dir, LORA, adapters), out) <= 1e-4
        # ... and differ from the base: the adapter changed the policy
        assert max_diff(base, out) > 1e-2
    # one adapter is loaded at a time: each version retired the previous one
    assert set(gen.llm.llm_engine.list_loras()) == {gen._adapters.request.lora_int_id}


def check_rejected(gen: VLLMGenerator, model_dir: str, tokenizer, staging: Path) -> None:
    batch, greedy = prompts(tokenizer, 3), SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    before, version, request = gen.generate(batch, sampling=greedy), gen.version, gen._adapters.request
    specs = adapter_specs(model_dir, LORA)
    renamed = {name.replace("lora_A", "lora_a"): t for name, t in random_adapters(specs, 0.5, seed=13).items()}
    with pytest.raises(ValueError, match=r"missing .*lora_A.weight.*unknown .*lora_a.weight"):
        gen.update_weights(version + 1, renamed)
    reshaped = random_adapters(specs, 0.5, seed=13)
    name = specs[0][0]
    reshaped[name] = torch.zeros(8, 128)  # rank 8 where the adapters have rank 4
    with pytest.raises(ValueError, match=rf"{name} has shape \(8, 128\)"):
        gen.update_weights(version + 1, reshaped)
    assert (gen.version, gen._adapters.request) == (version, request)
    assert [p.name for p in next(staging.iterdir()).iterdir()] == [f"v{version}"]  # no folder of a rejected update
    after = gen.generate(batch, sampling=greedy)
    for a, b in zip(before, after):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.allclose(a.behaviour_logp, b.behaviour_logp, atol=1e-6)


def check_cleanup(staging: Path) -> None:
    assert os.listdir(staging) == [], os.listdir(staging)  # the closed generator's adapter folders are gone


def check_lm_head(model_dir: str, staging: Path) -> None:
    config = GeneratorConfig(model=model_dir, backend="vllm", max_model_len=MAX_MODEL_LEN, kv_cache_bytes=1 << 27,
                             staging_dir=str(staging), lora=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"not on \['lm_head'\] \(model.lora.target_modules\).*model.lora.sync: merged"):
        VLLMGenerator(config)
    assert os.listdir(staging) == []


def run(name: str, check, *args) -> None:
    try:
        check(*args)
    except (Exception, pytest.fail.Exception):  # pytest.raises fails with the latter (not an Exception)
        print(f"{name}: failed\n{traceback.format_exc()}", flush=True)
    else:
        print(f"{name}: ok", flush=True)


def main(model_dir: str, root: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    staging = Path(tempfile.mkdtemp(dir=root))
    gen = VLLMGenerator(GeneratorConfig(model=model_dir, backend="vllm", max_model_len=MAX_MODEL_LEN,
                                        kv_cache_bytes=1 << 27, staging_dir=str(staging), lora=LORA))
    assert not gen.config.vllm_in_processes
    try:
        run("sync", check_sync, gen, model_dir, tokenizer)
        run("rejected", check_rejected, gen, model_dir, tokenizer, staging)
    finally:
        gen.close()
    run("cleanup", check_cleanup, staging)
    run("lm_head", check_lm_head, model_dir, Path(tempfile.mkdtemp(dir=root)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
