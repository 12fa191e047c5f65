"""Continuous generation and streamed steps end to end (real vLLM generator processes, real transport): the
batch engine unchanged with continuous generation in sync mode, every prompt trained exactly num_generations
times within the staleness bound through a resume with sequences in flight and a generator killed mid-sequence."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import torch
from _runs import run_config
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import latest_checkpoint
from rlhf_engine.engine.core import Callback, RLHFEngine
from tests.helpers.generators import generator_pids

pytestmark = pytest.mark.vllm

GROUPS = {"advantage_estimator": "grpo", "num_generations": 2}


class TrainedPrompts(Callback):
    """The wire prompt id of every trained rollout, and a trainer slowed down by `delay_s` per step."""

    def __init__(self, delay_s: float = 0.0):
        self.ids: Counter[int] = Counter()
        self.delay_s = delay_s

        self.lengths: dict[tuple[int, ...], list[int]] = {}
        self.steps: list[set[int]] = [set()]
        """The wire prompt ids each step trained."""

    def on_rollout(self, rollout):
        self.ids[rollout.prompt_id] += 1
        self.steps[-1].add(rollout.prompt_id)
        self.lengths.setdefault(tuple(rollout.prompt_ids.tolist()), []).append(int(rollout.response_ids.numel()))

    def on_step(self, step, stats):
        self.steps.append(set())
        time.sleep(self.delay_s)


def _config(tmp_path, policy_dir, prompts_file, generator=None, **engine):
    return run_config(tmp_path, policy_dir, prompts_file, backend="vllm", ppo=GROUPS,
                      generator={"sampling": {"n": 2}, **(generator or {})}, **engine)


def test_continuous_generation_in_sync_mode_is_the_batch_engine_bit_for_bit(tmp_path, policy_dir, prompts_file):
    pytest.importorskip("vllm")
    weights = []
    for name, inflight in (("batch", {}), ("continuous", {"max_inflight": 16, "inflight_update": "off"})):
        cfg = _config(tmp_path / name, policy_dir, prompts_file, generator=inflight, total_steps=2, mode="sync")
        with RLHFEngine(cfg) as engine:
            engine.train()
        weights.append(load_file(str(latest_checkpoint(tmp_path / name / "run") / "policy" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def _budget_prompts(tmp_path, policy_dir, prompts_file):
    """The prompts, each with its own budget of 1..8 tokens (long and short groups finish out of order), and the
    budget of each prompt's token ids."""
    from transformers import AutoTokenizer

    def budget(text):  # one per prompt text (the prompt set repeats some)
        return 1 + sum(map(ord, text)) % 8

    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    path = tmp_path / "budgets.jsonl"
    path.write_text("".join(json.dumps({**r, "budget": budget(r["prompt"])}) + "\n" for r in records))
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    budget_of = {tuple(tokenizer(r["prompt"])["input_ids"][-16:]): budget(r["prompt"]) for r in records}
    assert len(set(budget_of.values())) > 4
    return path, budget_of


class KillAt(TrainedPrompts):
    """Kills the generator (SIGKILL) after step `step`, its sequences running."""

    def __init__(self, step: int):
        super().__init__()
        self.kill_step = step

    def on_step(self, step, stats):
        super().on_step(step, stats)
        if step == self.kill_step:
            os.kill(generator_pids()[0], signal.SIGKILL)


@pytest.mark.parametrize("inflight_update, fault", [("keep", "resume"), ("recompute", "killed_generator")])
def test_streamed_steps_train_each_prompt_exactly_once_through_a_fault(
        tmp_path, policy_dir, prompts_file, assert_no_new_children, inflight_update, fault):
    """A resume from a checkpoint taken with sequences in flight (a slow trainer: the generator runs ahead), or a
    generator killed mid-sequence (its prompts handed out again): every prompt is trained exactly
    num_generations times, each sample with its prompt's whole budget, within the staleness bound."""
    pytest.importorskip("vllm")
    steps, per_step, staleness = 5, 4, 2
    budgets, budget_of = _budget_prompts(tmp_path, policy_dir, prompts_file)
    cfg = _config(tmp_path, policy_dir, budgets, total_steps=steps, mode="async", max_staleness=staleness,
                  streaming=True, save_steps=1, data={"max_new_tokens_field": "budget"}, reissue_timeout_s=20.0,
                  generator={"max_inflight": 8, "inflight_update": inflight_update,
                             "sampling": {"n": 2, "ignore_eos": True}},
                  transport={"shm_dir": str(tmp_path / "shm"), "heartbeat_timeout_s": 5.0})
    (tmp_path / "shm").mkdir()
    if fault == "resume":
        runs = [TrainedPrompts(delay_s=0.3), TrainedPrompts()]
        with RLHFEngine(cfg, callbacks=[runs[0]]) as engine:
            history = engine.train(steps=3)  # stops with prompts handed out and sequences running
        with RLHFEngine(cfg, callbacks=[runs[1]], resume=tmp_path / "run") as engine:
            assert engine.step == 3
            history += engine.train()
    else:
        runs = [KillAt(step=2)]
        with RLHFEngine(cfg, callbacks=runs) as engine:
            history = engine.train()
        assert history[-1]["faults/generator_restarts"] == 1
    assert_no_new_children()
    trained = sum((r.ids for r in runs), Counter())
    # no prompt trained twice or in part; every step a full batch
    assert set(trained.values()) == {2} and sum(trained.values()) == steps * 8
    # steps were built from the groups that finished first, not from one batch each
    steps_trained = [ids for r in runs for ids in r.steps if ids]
    assert any(len({pid // per_step for pid in ids}) > 1 for ids in steps_trained), steps_trained
    # every prompt due by the last step was trained: none lost with sequences in flight
    assert set(range((steps - 1) * per_step)) <= set(trained)
    for h in history:
        assert h["async/token_age_max"] <= staleness
        assert abs(sum(h[f"async/token_age/{k}"] for k in range(int(h["async/token_age_max"]) + 1)) - 1) < 1e-9
    assert max(h["async/token_age_max"] for h in history) >= 1  # the run did sample ahead
    assert history[-1]["async/response_length/sampled_mean"] > 0
    # each sample got exactly its prompt's budget (re-prefilled ones too: the budget is what is left)
    for r in runs:
        for prompt, got in r.lengths.items():
            assert got == [budget_of[prompt]] * len(got), (prompt, got)
