"""A run with a multi-turn environment, end to end: the trainer sends each prompt's record, the generator (vLLM,
its own process) plays the episodes, the trainer trains on the sampled tokens with the environment's reward,
logs the episode metrics and evaluates through the same environment."""

from __future__ import annotations

import json

import pytest

from rlhf_engine import RLHFEngine
from rlhf_engine.engine.config import load_run_config
from rlhf_engine.engine.core import Callback
from rlhf_engine.envs.guess_number import GuessNumber
from rlhf_engine.envs.template import ChatTemplate
from rlhf_engine.models.tiny import TINY_CHAT_TEMPLATE, make_tiny_model_dir


class Rollouts(Callback):
    def __init__(self):
        self.rollouts = []

    def on_rollout(self, rollout):
        self.rollouts.append(rollout)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("env_run") / "policy", chat_template=TINY_CHAT_TEMPLATE)


def write_records(path, targets):
    path.write_text("".join(json.dumps({"prompt": "guess", "target": t}) + "\n" for t in targets))
    return path


@pytest.mark.vllm
def test_guess_the_number_run(tmp_path, chat_policy, assert_no_new_children):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    cfg = load_run_config(None, base={
        "model": {"policy": str(chat_policy)},  # no reward function: the environment rewards every episode
        "data": {"prompts": str(write_records(tmp_path / "train.jsonl", [i % 10 for i in range(32)])),
                 "eval_prompts": str(write_records(tmp_path / "eval.jsonl", [3, 7])), "max_prompt_length": 128},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3, "response_length": 64,
                "num_generations": 2, "advantage_estimator": "grpo", "seed": 0},
        "generator": {"backend": "vllm", "max_model_len": 192, "kv_cache_bytes": 1 << 26,
                      "environment": {"name": "rlhf_engine.envs.guess_number:GuessNumber", "max_turns": 3,
                                      "max_turn_tokens": 4, "kwargs": {"max_guesses": 3}}},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 20.0},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl"], "progress": False, "total_steps": 2,
                   "mode": "async", "eval_steps": 2},
    })
    rec = Rollouts()
    with RLHFEngine(cfg, callbacks=[rec]) as engine:
        history = engine.train()
    assert_no_new_children()

    template = ChatTemplate(AutoTokenizer.from_pretrained(chat_policy))
    train = [r for r in rec.rollouts if not r.eval]
    assert len(train) == 2 * 8
    for r in train:  # the environment's opening, rendered in the generator, is what the trainer trained on
        opening = GuessNumber(max_guesses=3).reset({"target": 0})
        assert r.prompt_ids.tolist() == template.prompt_ids(opening)
        assert r.reward is not None or r.episode.truncated
        assert r.turn_starts.numel() == r.episode.turns and not r.loss_mask.all() or r.episode.turns == 1
    for h in history:
        assert h["env/turns_mean"] > 1.0 and 0.0 < h["env/masked_token_share"] < 1.0
        assert "env/episode/solved" in h and h["env/env_reward_share"] > 0.0
    final = history[-1]
    assert "eval/reward_mean" in final and "eval/turns_mean" in final
