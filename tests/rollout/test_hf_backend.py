"""The transformers backend: sampler log-probs, weight updates, left padding, sampling params."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.hf_backend import HFGenerator
from tests.helpers.rollout import perturbed_state, prompts, reference_logprobs, stop_string_case


@pytest.fixture(scope="module")
def hf_generator(tiny_model_dir):
    gen = HFGenerator(GeneratorConfig(model=tiny_model_dir, backend="transformers", max_model_len=256))
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A private fp32 copy (the session-wide `hf_reference` is updated by the vLLM tests)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_logprobs_match_the_model_before_and_after_an_update(hf_generator, reference, tiny_model_dir):
    from transformers import AutoTokenizer

    batch = prompts(AutoTokenizer.from_pretrained(tiny_model_dir), 5)
    sampling = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    for c in hf_generator.generate(batch, sampling=sampling):
        assert (reference_logprobs(reference, c) - c.behaviour_logp).abs().max().item() <= 1e-4

    new = perturbed_state(reference, scale=0.05, seed=21)
    version = hf_generator.version + 1
    assert hf_generator.update_weights(version, new)
    assert not hf_generator.update_weights(version, perturbed_state(reference, scale=1.0, seed=22))
    reference.load_state_dict(new, strict=False)
    out = hf_generator.generate(batch, sampling=SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=30))
    assert {c.policy_version for c in out} == {version}
    for c in out:
        assert (reference_logprobs(reference, c, temperature=0.8, top_k=30) - c.behaviour_logp).abs().max().item() <= 1e-4


def test_left_padding_does_not_change_results(hf_generator):
    short, long = [1, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56, 57]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    alone = hf_generator.generate([short], sampling=greedy)[0]
    padded = hf_generator.generate([long, short], sampling=greedy)[1]  # short gets 6 pad tokens on the left
    assert padded.response_ids.tolist() == alone.response_ids.tolist()
    assert (padded.behaviour_logp - alone.behaviour_logp).abs().max().item() <= 1e-4


def test_n_seed_and_stops(hf_generator, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = prompts(tokenizer, 2)
    sampling = SamplingConfig(n=3, max_new_tokens=10, ignore_eos=True)
    a = hf_generator.generate(batch, sampling=sampling, seed=5)
    b = hf_generator.generate(batch, sampling=sampling, seed=5)
    c = hf_generator.generate(batch, sampling=sampling, seed=6)
    assert [(x.prompt_id, x.sample_id) for x in a] == [(i, f"{i}/{j}") for i in range(2) for j in range(3)]
    assert [x.response_ids.tolist() for x in a] == [x.response_ids.tolist() for x in b]
    assert [x.response_ids.tolist() for x in a] != [x.response_ids.tolist() for x in c]
    assert len({tuple(x.response_ids.tolist()) for x in a[:3]}) == 3

    greedy = SamplingConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
    tokens = hf_generator.generate(batch[:1], sampling=greedy)[0].response_ids.tolist()
    stop, length = stop_string_case(tokenizer, tokens)
    out = hf_generator.generate(batch[:1], sampling=SamplingConfig(max_new_tokens=40, temperature=0, stop=(stop,)))[0]
    assert (out.finish_reason, out.response_ids.tolist()) == ("stop", tokens[:length])
    first = tokens.index(tokens[5])
    out = hf_generator.generate(
        batch[:1], sampling=SamplingConfig(max_new_tokens=40, temperature=0, stop_token_ids=(tokens[5],), ignore_eos=True)
    )[0]
    assert (out.finish_reason, out.response_ids.tolist()) == ("stop", tokens[: first + 1])
