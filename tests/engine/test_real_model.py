"""The real pretrained model end to end (SmolLM2-135M-Instruct, `make real-model`): chat prompts rendered with
its template, rollouts from vLLM, one PPO step on exactly the sampled ids, and a checkpoint whose `policy/` folder vLLM
serves as is (`test_served_policy.py` checks the same of the tiny model, in the slow run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import latest_checkpoint
from rlhf_engine.engine.config import load_run_config
from rlhf_engine.engine.core import Callback, RLHFEngine
from rlhf_engine.trainer.ppo import trainer as ppo_module

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

QUESTIONS = [(3, 4), (12, 9), (25, 17), (8, 6)]


SERVE = """
import json, sys
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.vllm_backend import VLLMGenerator

config = GeneratorConfig(model=sys.argv[1], backend="vllm", max_model_len=256, kv_cache_bytes=1 << 28)
with VLLMGenerator(config) as gen:
    (out,) = gen.generate([json.loads(sys.argv[2])], sampling=SamplingConfig(max_new_tokens=8, ignore_eos=True))
print(json.dumps({"response_ids": out.response_ids.tolist(), "behaviour_logp": out.behaviour_logp.tolist()}))
"""
"""vLLM serving a model folder as is, in a process of its own with its engine in process (one process start
instead of two; in process, vLLM takes over torch.set_num_threads): 8 sampled tokens and their log-probs."""


def serve_once(model_dir: Path, prompt: list[int]) -> SimpleNamespace:
    """The completion of `prompt` that vLLM samples from `model_dir` (SERVE), as the reference log-probs take it."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SERVE, str(model_dir), json.dumps(prompt)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return SimpleNamespace(prompt_ids=torch.tensor(prompt), response_ids=torch.tensor(out["response_ids"]),
                           behaviour_logp=torch.tensor(out["behaviour_logp"]))


class Rollouts(Callback):
    def __init__(self):
        self.received = []

    def on_rollout(self, rollout):
        self.received.append((rollout.prompt_ids.tolist(), rollout.response_ids.tolist()))


@pytest.fixture
def chat_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Compute {a} + {b}. End with "
                                                                              "'#### N'."}],
                                        "answer": str(a + b)}) + "\n" for a, b in QUESTIONS))
    return path


def test_one_ppo_step_on_the_real_model_trains_the_sampled_ids_and_serves(tmp_path, real_model_dir, chat_prompts,
                                                                          monkeypatch, assert_no_new_children):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.rollout import reference_logprobs

    trained_batches = []
    make_token_batch = ppo_module.make_token_batch

    def recorded(queries, responses, *args, **kwargs):
        batch = make_token_batch(queries, responses, *args, **kwargs)
        trained_batches.append(batch)
        return batch

    monkeypatch.setattr(ppo_module, "make_token_batch", recorded)
    cfg = load_run_config(None, base={
        "model": {"policy": str(real_model_dir), "reward_fn": "rlhf_engine.rewards:correct"},
        "data": {"prompts": str(chat_prompts), "max_prompt_length": 64},
        "ppo": {"batch_size": 4, "mini_batch_size": 4, "num_generations": 2, "ppo_epochs": 1, "learning_rate": 1e-5,
                "response_length": 24, "seed": 0, "advantage_estimator": "grpo"},
        "generator": {"backend": "vllm", "max_model_len": 256, "kv_cache_bytes": 1 << 28},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 60.0},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl"], "progress": False, "mode": "sync",
                   "total_steps": 1, "save_steps": 1},
    })
    rollouts = Rollouts()
    with RLHFEngine(cfg, callbacks=[rollouts]) as engine:
        engine.train()
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)

    # chat prompts went out rendered with the model's template and its generation prompt
    rendered = {tuple(tokenizer.apply_chat_template([{"role": "user", "content": f"Compute {a} + {b}. End with "
                                                     "'#### N'."}], add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)) for a, b in QUESTIONS}
    assert len(rollouts.received) == 4 and {tuple(p) for p, _ in rollouts.received} <= rendered
    # token in, token out: the trained batch holds exactly the ids vLLM returned (cut after <|im_end|> = 2)
    (batch,) = trained_batches
    rows = [batch.response_ids[i, : int(batch.response_mask[i].sum())].tolist() for i in range(4)]
    assert sorted(rows) == sorted(r for _, r in rollouts.received)
    for _, response in rollouts.received:
        assert 2 not in response[:-1]  # vLLM stopped at the first end of turn
    assert batch.has_eos.tolist() == [row[-1] == 2 for row in rows]

    # the checkpoint's policy folder serves as is: the trained policy alone (the value head beside it), which vLLM
    # loads without edits and samples with the trained weights
    served = latest_checkpoint(tmp_path / "run") / "policy"
    assert not list(served.glob("value_head*")) and (served.parent / "value_head.safetensors").is_file()
    trained, initial = load_file(str(served / "model.safetensors")), load_file(str(real_model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # a trained policy, not the initial one
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Compute 2 + 2."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    out = serve_once(served, prompt)
    hf = AutoModelForCausalLM.from_pretrained(served, dtype=torch.float32).eval()
    assert float((reference_logprobs(hf, out) - out.behaviour_logp).abs().max()) <= 1e-3
    assert_no_new_children()
