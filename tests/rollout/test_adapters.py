"""Adapter-only weight updates: the adapter names and shapes against peft, the run's generator
config, and the transformers backend taking adapters in place."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.models.lora import LoraConfig, adapter_state_dict
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig, run_generator_config
from rlhf_engine.transport.weights import adapter_specs, dir_fingerprint, stored_params, sync_fingerprint, weight_specs
from tests.helpers.rollout import peft_reference, prompts, random_adapters, reference_logprobs

pytest.importorskip("peft")

LORA = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], ["v_proj", "down_proj"], "all-linear"])
def test_adapter_specs_are_what_peft_saves(tiny_model_dir, targets):
    lora = LoraConfig(r=4, target_modules=targets)
    saved = adapter_state_dict(peft_reference(tiny_model_dir, lora))
    assert adapter_specs(tiny_model_dir, lora) == [(n, tuple(t.shape), "float32") for n, t in saved.items()]
    # e.g. layer 0's q_proj of the tiny Llama (hidden 128): A [r, in], B [out, r]
    if "q_proj" in targets or targets == "all-linear":
        rows = {name: shape for name, shape, _ in adapter_specs(tiny_model_dir, lora)}
        assert rows["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 128)
        assert rows["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (128, 4)


def test_weight_specs_and_fingerprint_follow_the_sync(tiny_model_dir):
    assert weight_specs(tiny_model_dir, None) == stored_params(tiny_model_dir)
    assert weight_specs(tiny_model_dir, LORA) == adapter_specs(tiny_model_dir, LORA)
    assert sync_fingerprint(tiny_model_dir, None) == dir_fingerprint(tiny_model_dir)
    # a generator set up for another kind of update (or another rank) is refused at the handshake
    prints = {sync_fingerprint(tiny_model_dir, lora) for lora in (None, LORA, LoraConfig(r=8, target_modules="all-linear"))}
    assert len(prints) == 3


def test_run_generator_config_takes_adapters_only_with_sync_adapters(tiny_model_dir):
    gen = GeneratorConfig(model=tiny_model_dir)
    assert run_generator_config(gen, LORA).lora == LORA
    assert run_generator_config(gen, LoraConfig(sync="merged")).lora is None
    assert run_generator_config(gen, None).lora is None
    with pytest.raises(ValueError, match="generator.lora .* follows model.lora"):
        run_generator_config(GeneratorConfig(model=tiny_model_dir, lora=LORA), None)
    with pytest.raises(ValueError, match=r"generator.lora.sync \('merged'\)"):
        GeneratorConfig(model=tiny_model_dir, lora=LoraConfig(sync="merged"))
    assert GeneratorConfig(model=tiny_model_dir, lora={"r": 4}).lora == LoraConfig(r=4)


def test_vllm_rank_is_the_smallest_it_accepts_and_a_larger_one_names_the_sync_switch():
    from rlhf_engine.rollout.vllm_adapters import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 4, 16, 17, 512)] == [1, 8, 16, 32, 512]
    with pytest.raises(ValueError, match=r"model.lora.r \(600\) > 512 .* model.lora.sync: merged"):
        max_lora_rank(600)


@pytest.fixture(scope="module")
def hf_lora_generator(tiny_model_dir):
    from rlhf_engine.rollout.hf_backend import HFGenerator

    gen = HFGenerator(GeneratorConfig(model=tiny_model_dir, backend="transformers", max_model_len=256, lora=LORA))
    yield gen
    gen.close()


def test_hf_backend_applies_adapters_in_place(hf_lora_generator, tiny_model_dir):
    from transformers import AutoTokenizer

    gen = hf_lora_generator
    batch = prompts(AutoTokenizer.from_pretrained(tiny_model_dir), 4)
    sampling = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    base = peft_reference(tiny_model_dir, LORA)  # peft's init: B = 0, the base model
    for c in gen.generate(batch, sampling=sampling):
        assert (reference_logprobs(base, c) - c.behaviour_logp).abs().max().item() <= 1e-4

    adapters = random_adapters(adapter_specs(tiny_model_dir, LORA), scale=0.1, seed=5)
    version = gen.version + 1
    assert gen.update_weights(version, adapters)
    out = gen.generate(batch, sampling=sampling)
    assert {c.policy_version for c in out} == {version}
    tuned = peft_reference(tiny_model_dir, LORA, adapters)
    for c in out:
        assert (reference_logprobs(tuned, c) - c.behaviour_logp).abs().max().item() <= 1e-4
    # the adapters changed the policy: the base gives these tokens other log-probs
    assert max((reference_logprobs(base, c) - c.behaviour_logp).abs().max().item() for c in out) > 1e-2


def test_hf_backend_rejects_wrong_adapters_before_applying(hf_lora_generator, tiny_model_dir):
    gen = hf_lora_generator
    specs = adapter_specs(tiny_model_dir, LORA)
    before = {name: t.clone() for name, t in gen._params.items()}
    version = gen.version
    full = {name: torch.zeros(shape) for name, shape, _ in stored_params(tiny_model_dir)}
    with pytest.raises(ValueError, match="missing .*lora_A.weight"):
        gen.update_weights(version + 1, full)  # full weights where adapters are expected
    wrong = random_adapters(specs, scale=1.0, seed=6)
    name = specs[-1][0]
    wrong[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 3\)"):
        gen.update_weights(version + 1, wrong)
    assert gen.version == version
    assert all(torch.equal(before[name], t) for name, t in gen._params.items())
