"""A run with a multi-turn environment, end to end: the trainer sends each prompt's record, the generator (vLLM,
its own process) plays the episodes, the trainer trains on the sampled tokens with the environment's reward,
logs the episode metrics and evaluates through the same environment."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from test_chaos import live_generator_pids

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


def env_config(tmp_path, chat_policy, backend: str, environment: dict, **engine):
    (tmp_path / "shm").mkdir(parents=True, exist_ok=True)
    return load_run_config(None, base={
        "model": {"policy": str(chat_policy)},  # no reward function: the environment rewards every episode
        "data": {"prompts": str(write_records(tmp_path / "train.jsonl", [i % 10 for i in range(32)])),
                 "max_prompt_length": 128,
                 **({"eval_prompts": str(write_records(tmp_path / "eval.jsonl", [3, 7]))} if "eval_steps" in engine
                    else {})},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3, "response_length": 64,
                "num_generations": 2, "advantage_estimator": "grpo", "seed": 0},
        "generator": {"backend": backend, "max_model_len": 192, "kv_cache_bytes": 1 << 26,
                      "environment": {"max_turns": 3, "max_turn_tokens": 4, **environment}},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 5.0, "shm_dir": str(tmp_path / "shm")},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl"], "progress": False, "mode": "async",
                   **engine},
    })


@pytest.mark.vllm
def test_guess_the_number_run(tmp_path, chat_policy, assert_no_new_children):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    cfg = env_config(tmp_path, chat_policy, "vllm", {"name": "rlhf_engine.envs.guess_number:GuessNumber",
                                                     "kwargs": {"max_guesses": 3}}, total_steps=2, eval_steps=2)
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
    # equal weights at step 1 (sampled by v0, trained at v0): vLLM's log-probs of the sampled tokens are the trainer's
    assert abs(history[0]["off_policy/behaviour_kl"]) < 1e-3
    for h in history:
        assert h["env/turns_mean"] > 1.0 and 0.0 < h["env/masked_token_share"] < 1.0
        assert "env/episode/solved" in h and h["env/env_reward_share"] > 0.0
    final = history[-1]
    assert "eval/reward_mean" in final and "eval/turns_mean" in final


def test_a_generator_killed_mid_episode_loses_nothing(tmp_path, chat_policy, assert_no_new_children):
    """Steps 2 and 3 lose their generator in the middle of episodes (every step of the environment takes 0.3 s):
    the prompts it held are handed out again, and every step still trains each of its prompts exactly
    num_generations times."""
    cfg = env_config(tmp_path, chat_policy, "transformers", {"name": "tests.engine._envs:SlowGuess",
                                                             "kwargs": {"max_guesses": 3, "delay_s": 0.3}},
                     total_steps=4, reissue_timeout_s=20.0, max_generator_restarts=2)
    rec = Rollouts()
    killed = []

    def kill_soon():
        time.sleep(0.4)  # into the first or second turn of the batch's episodes
        pids = live_generator_pids()
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    with RLHFEngine(cfg, callbacks=[rec]) as engine:
        history = []
        for stats in engine.steps():
            history.append(stats)
            if engine.step in (1, 2):
                thread = threading.Thread(target=kill_soon)
                thread.start()
                thread.join()
    assert_no_new_children()
    assert os.listdir(tmp_path / "shm") == []
    assert len(killed) == 2 and history[-1]["faults/generator_restarts"] == 2
    assert history[-1]["faults/reissued_prompts"] >= 1
    train = [r for r in rec.rollouts if not r.eval]
    assert len(train) == 4 * 8
    for step in range(4):  # wire prompt ids of step b: 4b .. 4b + 3, each num_generations = 2 times
        ids = sorted(r.prompt_id for r in train[step * 8:(step + 1) * 8])
        assert ids == sorted(list(range(4 * step, 4 * step + 4)) * 2), (step, ids)


def test_lockstep_env_run_resumes_bit_exact(tmp_path, chat_policy, assert_no_new_children):
    """A run of episodes resumed from its step-2 checkpoint trains the same weights as the run straight through
    (sync mode, lockstep turns: which episodes share a `generate` call depends only on the episodes)."""
    from safetensors.torch import load_file

    from rlhf_engine.common.checkpoint import latest_checkpoint

    environment = {"name": "rlhf_engine.envs.guess_number:GuessNumber", "kwargs": {"max_guesses": 3},
                   "lockstep": True}
    straight = env_config(tmp_path / "a", chat_policy, "transformers", environment, total_steps=3, save_steps=1)
    straight.engine.mode = "sync"
    with RLHFEngine(straight) as engine:
        engine.train()
    # its step-2 checkpoint continued by another run
    resumed = env_config(tmp_path / "b", chat_policy, "transformers", environment, total_steps=3, save_steps=1)
    resumed.engine.mode = "sync"
    with RLHFEngine(resumed, resume=tmp_path / "a" / "run" / "checkpoints" / "step-00000002") as engine:
        assert engine.step == 2
        engine.train()
    assert_no_new_children()
    a, b = latest_checkpoint(tmp_path / "a" / "run"), latest_checkpoint(tmp_path / "b" / "run")
    assert a.name == b.name == "step-00000003"
    wa, wb = load_file(str(a / "policy" / "model.safetensors")), load_file(str(b / "policy" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
