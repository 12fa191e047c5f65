"""Weight updates between decode steps on an in-process vLLM engine, checked against transformers; run by
`test_continuous.py` as `python -m tests.rollout.inflight_checks MODEL_DIR STAGING_DIR` (prints `OK`).

- keep: each sequence's versions switch once, where the update landed; its tokens before the switch have the old
  weights' log-probs, those after are not the old weights' (new weights on the old KV).
- recompute: the same switch; the tokens after it have exactly the new weights' log-probs (KV computed again).
- salt: a request added after an update, with the prompt of a request still running on the old weights' KV
  blocks, gets the new weights' log-probs (a prefix-cache hit on the old blocks would not).
- eager: with `enforce_eager` (the default) no step compiled anything with torch.compile.

The engine is vLLM's default for the generator, in this process: every update loads the received tensors
straight into it, with no staging copy (the caller checks that STAGING_DIR stays empty).
"""

from __future__ import annotations

import sys

import torch

from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.vllm_backend import VLLMGenerator
from tests.helpers.rollout import perturbed_state, prompts, reference_logprobs, run_until

TOKENS = 40


def diff(model, sample, tokens: slice) -> float:
    return (reference_logprobs(model, sample)[tokens] - sample.behaviour_logp[tokens]).abs().max().item()


def check_update(gen, reference, batch, mode: str, seed: int) -> None:
    old = {name: p.detach().clone() for name, p in reference.named_parameters()}
    v = gen.version
    gen.submit(None, batch, sampling=SamplingConfig(max_new_tokens=TOKENS, ignore_eos=True), seed=seed)
    run_until(gen, steps=6)  # in process, a step is one token of every sequence
    done_before = {len(seq.ids) for seq in gen._running.values()}
    assert gen.running == len(batch) and len(done_before) == 1, done_before
    landed = done_before.pop()
    new = perturbed_state(reference, scale=0.05, seed=seed)
    assert gen.update_weights(v + 1, new)
    assert gen.last_update_s[0] == 0.0  # no staging copy
    if mode == "recompute":
        assert gen.recompute() == len(batch)
    samples = [s for _, s in run_until(gen)]
    assert len(samples) == len(batch)
    for s in samples:
        assert s.policy_versions.tolist() == [v] * landed + [v + 1] * (TOKENS - landed), s.policy_versions.tolist()
        reference.load_state_dict(old, strict=False)
        assert diff(reference, s, slice(0, landed)) <= 1e-4
        after = diff(reference, s, slice(landed, None))
        assert after > 1e-3, after  # the new weights sampled them
        reference.load_state_dict(new, strict=False)
        if mode == "recompute":
            assert diff(reference, s, slice(landed, None)) <= 1e-4
    reference.load_state_dict(new, strict=False)  # the engine keeps v + 1
    print(f"{mode}: ok (switch after {landed} of {TOKENS} tokens)")


def check_salt(gen, reference, tokenizer) -> None:
    assert gen.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    block = gen.llm.llm_engine.vllm_config.cache_config.block_size
    prompt = [tokenizer.bos_token_id, *range(40, 40 + min(2 * block, 200))]  # one full KV block or more
    v = gen.version
    gen.submit("A", [prompt], sampling=SamplingConfig(max_new_tokens=30, ignore_eos=True), seed=1)
    run_until(gen, steps=4)
    new = perturbed_state(reference, scale=0.05, seed=12)
    assert gen.update_weights(v + 1, new)  # A runs: the prefix cache is not reset
    gen.submit("B", [prompt], sampling=SamplingConfig(max_new_tokens=8, ignore_eos=True), seed=2)
    done = dict(run_until(gen))
    reference.load_state_dict(new, strict=False)
    assert done["B"].policy_versions.tolist() == [v + 1] * 8
    assert diff(reference, done["B"], slice(None)) <= 1e-4
    assert done["A"].policy_versions[0] == v and done["A"].policy_versions[-1] == v + 1
    print("salt: ok")


def main(model_dir: str, staging: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GeneratorConfig(model=model_dir, backend="vllm", max_model_len=256, kv_cache_bytes=1 << 26,
                             staging_dir=staging, max_inflight=16, inflight_update="keep")
    assert not config.vllm_in_processes
    with VLLMGenerator(config) as gen:
        batch = prompts(tokenizer, 3)
        check_update(gen, reference, batch, "keep", seed=21)
        check_update(gen, reference, batch, "recompute", seed=22)
        check_salt(gen, reference, tokenizer)
    # with enforce_eager nothing was compiled, vLLM's own sampler helpers included (`VLLMGenerator._sampling`)
    from torch._dynamo.utils import counters

    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])
    print("eager: ok")
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
