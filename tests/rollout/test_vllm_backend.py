"""The vLLM backend on a real CPU engine: sampler log-probs, weight updates, sampling params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_engine.rollout.config import SamplingConfig
from tests.helpers.rollout import perturbed_state, prompts, reference_logprobs, stop_string_case

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def max_logprob_diff(model, completions, **processing) -> float:
    return max((reference_logprobs(model, c, **processing) - c.behaviour_logp).abs().max().item() for c in completions)


def test_update_reaches_engine_and_stale_versions_are_ignored(vllm_generator, hf_reference, tokenizer):
    gen, batch = vllm_generator, prompts(tokenizer, 6)
    sampling = SamplingConfig(max_new_tokens=24, ignore_eos=True)
    base_version = gen.version
    assert max_logprob_diff(hf_reference, gen.generate(batch, sampling=sampling)) <= 1e-4

    new = perturbed_state(hf_reference, scale=0.05, seed=1)
    assert gen.update_weights(base_version + 1, new)
    out = gen.generate(batch, sampling=sampling)
    assert {c.policy_version for c in out} == {base_version + 1}
    hf_reference.load_state_dict(new, strict=False)
    # the engine's sampler log-probs of its own tokens equal transformers' under the new weights
    assert max_logprob_diff(hf_reference, out) <= 1e-4

    # a duplicate and an older version are ignored: the engine keeps the weights of v+1
    other = perturbed_state(hf_reference, scale=0.5, seed=2)
    assert not gen.update_weights(base_version + 1, other)
    assert not gen.update_weights(base_version, other)
    assert gen.version == base_version + 1
    assert max_logprob_diff(hf_reference, gen.generate(batch, sampling=sampling)) <= 1e-4


def test_invalid_update_changes_nothing(vllm_generator, hf_reference, tokenizer):
    gen, batch = vllm_generator, prompts(tokenizer, 3)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0)
    before = gen.generate(batch, sampling=sampling)
    version = gen.version
    partial = perturbed_state(hf_reference, scale=0.5, seed=3)
    partial.pop("lm_head.weight")
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        gen.update_weights(version + 1, partial)
    wrong = perturbed_state(hf_reference, scale=0.5, seed=3)
    wrong["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(7,\)"):
        gen.update_weights(version + 1, wrong)
    assert gen.version == version
    after = gen.generate(batch, sampling=sampling)
    for a, b in zip(before, after):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.allclose(a.behaviour_logp, b.behaviour_logp, atol=1e-6)


def test_logprobs_are_the_samplers_distribution(vllm_generator, hf_reference, tokenizer):
    # temperature and top-k reshape the distribution; the reported log-probs are of the reshaped one
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.7, top_k=20, ignore_eos=True)
    out = vllm_generator.generate(prompts(tokenizer, 4), sampling=sampling)
    assert max_logprob_diff(hf_reference, out, temperature=0.7, top_k=20) <= 1e-4
    assert all(bool((c.behaviour_logp > -torch.inf).all()) for c in out)


def test_n_and_seed(vllm_generator, tokenizer):
    batch = prompts(tokenizer, 3)
    sampling = SamplingConfig(n=4, max_new_tokens=12, ignore_eos=True)
    a = vllm_generator.generate(batch, sampling=sampling, seed=123)
    assert [(c.prompt_id, c.sample_id) for c in a] == [(i, f"{i}/{j}") for i in range(3) for j in range(4)]
    assert all(len(c.response_ids) == 12 and c.finish_reason == "length" for c in a)
    # the n samples of one prompt differ; the same seed gives the same tokens, another seed others
    assert len({tuple(c.response_ids.tolist()) for c in a[:4]}) == 4
    b = vllm_generator.generate(batch, sampling=sampling, seed=123)
    assert [c.response_ids.tolist() for c in a] == [c.response_ids.tolist() for c in b]
    c = vllm_generator.generate(batch, sampling=sampling, seed=124)
    assert [x.response_ids.tolist() for x in a] != [x.response_ids.tolist() for x in c]


def test_stop_string_and_stop_token_end_the_response(vllm_generator, tokenizer):
    batch = prompts(tokenizer, 1)
    greedy = SamplingConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
    tokens = vllm_generator.generate(batch, sampling=greedy)[0].response_ids.tolist()
    stop, length = stop_string_case(tokenizer, tokens)
    out = vllm_generator.generate(batch, sampling=SamplingConfig(max_new_tokens=40, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.response_ids.tolist() == tokens[:length]
    assert stop in tokenizer.decode(out.response_ids, skip_special_tokens=True)

    stop_token = tokens[5]
    first = tokens.index(stop_token)
    out = vllm_generator.generate(
        batch, sampling=SamplingConfig(max_new_tokens=40, temperature=0, stop_token_ids=(stop_token,), ignore_eos=True)
    )[0]
    assert (out.finish_reason, out.response_ids.tolist()) == ("stop", tokens[: first + 1])


def test_a_batch_past_the_engines_token_budget_samples_as_its_halves(vllm_generator):
    """More prompt tokens than vLLM schedules in one step (4096): no seeded request is prefilled in chunks
    (vLLM-CPU cannot rewind a seeded CPU generator for a partial prefill, and the engine died), and each
    prompt's samples are the same as in a smaller batch."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(3, 500, (200,), generator=g).tolist() for _ in range(24)]  # 4800 prompt tokens
    sampling = SamplingConfig(n=2, max_new_tokens=4, ignore_eos=True)
    whole = vllm_generator.generate(batch, sampling=sampling, seed=7)
    half = vllm_generator.generate(batch[:12], sampling=sampling, seed=7)
    assert len(whole) == 48 and all(len(c.response_ids) == 4 for c in whole)
    assert [c.response_ids.tolist() for c in whole[:24]] == [c.response_ids.tolist() for c in half]


def test_the_engine_processes_bind_their_sockets_in_the_generators_folder(vllm_generator):
    # vLLM leaves them behind when it shuts down; the generator removes its folder when it closes (the fixture
    # checks that)
    folder = Path(vllm_generator.sockets_dir)
    assert folder.name.startswith("rlhf-engine-vllm-") and any(p.is_socket() for p in folder.iterdir())
