"""Adapter-only weight sync into a real CPU vLLM engine: each version a new LoRA adapter."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.transport.weights import adapter_specs
from tests.helpers.rollout import peft_reference, prompts, random_adapters, reference_logprobs
from tests.rollout.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.vllm

# r = 4 runs with max_lora_rank 8 (the smallest rank vLLM accepts above it); all-linear packs q/k/v and gate/up
LORA = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def vllm_lora_generator(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    from rlhf_engine.rollout.vllm_backend import VLLMGenerator

    staging = tmp_path_factory.mktemp("lora_staging")
    # engine_process: vLLM out of the test process (in process it takes over torch.set_num_threads there)
    gen = VLLMGenerator(GeneratorConfig(model=tiny_model_dir, backend="vllm", max_model_len=MAX_MODEL_LEN,
                                        kv_cache_bytes=1 << 27, staging_dir=str(staging), lora=LORA,
                                        engine_process=True))
    yield gen, staging
    gen.close()
    assert os.listdir(staging) == []  # the adapter folders are gone


def max_diff(model, completions) -> float:
    return max((reference_logprobs(model, c) - c.behaviour_logp).abs().max().item() for c in completions)


def test_adapter_sync_matches_transformers_with_the_same_adapters(vllm_lora_generator, tiny_model_dir, tokenizer):
    gen, _ = vllm_lora_generator
    batch, sampling = prompts(tokenizer, 5), SamplingConfig(max_new_tokens=20, ignore_eos=True)
    base = peft_reference(tiny_model_dir, LORA)
    assert max_diff(base, gen.generate(batch, sampling=sampling)) <= 1e-4  # v0: the all-zero adapter = the base

    specs = adapter_specs(tiny_model_dir, LORA)
    for step, seed in enumerate((11, 12), start=1):
        adapters = random_adapters(specs, scale=0.1, seed=seed)
        version = gen.version + 1
        assert gen.update_weights(version, adapters)
        out = gen.generate(batch, sampling=sampling)
        assert {c.policy_version for c in out} == {version}
        assert gen._adapters.request.lora_name == f"policy-v{version}"
        # vLLM's sampler log-probs under the adapter equal transformers + peft with the same adapter ...
        assert max_diff(peft_reference(tiny_model_dir, LORA, adapters), out) <= 1e-4
        # ... and differ from the base: the adapter changed the policy
        assert max_diff(base, out) > 1e-2
    # one adapter is loaded at a time: each version retired the previous one
    assert set(gen.llm.llm_engine.list_loras()) == {gen._adapters.request.lora_int_id}


def test_wrong_adapters_are_rejected_before_anything_is_applied(vllm_lora_generator, tiny_model_dir, tokenizer):
    gen, staging = vllm_lora_generator
    batch, greedy = prompts(tokenizer, 3), SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    before, version, request = gen.generate(batch, sampling=greedy), gen.version, gen._adapters.request
    specs = adapter_specs(tiny_model_dir, LORA)
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


def test_adapters_vllm_does_not_serve_like_peft_name_the_sync_switch(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from rlhf_engine.rollout.vllm_backend import VLLMGenerator

    # vLLM 0.32 takes an lm_head adapter without an error, but its log-probs were 1.8 nats from peft's:
    # the generator refuses it at start and points at the merged sync
    config = GeneratorConfig(model=tiny_model_dir, backend="vllm", max_model_len=MAX_MODEL_LEN, kv_cache_bytes=1 << 27,
                             staging_dir=str(tmp_path), lora=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
                             engine_process=True)
    with pytest.raises(ValueError, match=r"not on \['lm_head'\] \(model.lora.target_modules\).*model.lora.sync: merged"):
        VLLMGenerator(config)
    assert os.listdir(tmp_path) == []
