"""A trained checkpoint's `policy/` serves as is: vLLM loads it without edits and samples with its weights."""

from __future__ import annotations

import pytest
import torch
from _runs import run_config
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import latest_checkpoint
from rlhf_engine.engine.core import RLHFEngine
from tests.helpers.rollout import prompts, reference_logprobs

# slow: test_real_model.py's test (default run) checks the same of the real model's checkpoint: policy folder
# without the value head, trained weights, vLLM loads it as is and samples with the trained weights' log-probs
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_trained_checkpoints_policy_folder_loads_in_vllm(tmp_path, policy_dir, prompts_file,
                                                          assert_no_new_children):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
    from rlhf_engine.rollout.vllm_backend import VLLMGenerator

    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="transformers", total_steps=1, mode="sync",
                     save_steps=1)
    with RLHFEngine(cfg) as engine:
        engine.train()
    served = latest_checkpoint(tmp_path / "run") / "policy"
    assert not list(served.glob("value_head*")) and (served.parent / "value_head.safetensors").is_file()
    trained = load_file(str(served / "model.safetensors"))
    initial = load_file(str(policy_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # a trained policy, not the initial one

    gen = VLLMGenerator(GeneratorConfig(model=str(served), backend="vllm", max_model_len=256, kv_cache_bytes=1 << 27,
                                        engine_process=True))
    try:
        out = gen.generate(prompts(AutoTokenizer.from_pretrained(served), 4),
                           sampling=SamplingConfig(max_new_tokens=12, ignore_eos=True))
    finally:
        gen.close()
    assert [len(c.response_ids) for c in out] == [12] * 4
    # the sampler's log-probs are the trained weights' (transformers on the same folder)
    hf = AutoModelForCausalLM.from_pretrained(served, dtype=torch.float32).eval()
    assert max(float((reference_logprobs(hf, c) - c.behaviour_logp).abs().max()) for c in out) <= 1e-4
    assert_no_new_children()
