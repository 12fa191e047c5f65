"""Reward and gold functions that record what they were given (`model.reward_fn: tests.helpers.columns:reward`),
for the tests of record fields reaching the reward (`rlhf_engine.data.columns`). They run in the trainer's
process (rank 0 of one rank), so the test reads `CALLS` directly."""

from __future__ import annotations

CALLS: list[dict] = []


def reward(prompts: list[str], completions: list[str], answer: list, n: list) -> list[float]:
    CALLS.append({"fn": "reward", "prompts": list(prompts), "answer": list(answer), "n": list(n)})
    return [float(len(c)) for c in completions]


def gold(prompts: list[str], completions: list[str], **columns) -> list[float]:
    CALLS.append({"fn": "gold", "prompts": list(prompts), **{k: list(v) for k, v in columns.items()}})
    return [0.0] * len(completions)


def needs_level(prompts: list[str], completions: list[str], level: list) -> list[float]:
    return [0.0] * len(completions)


def length_plus_n(prompts: list[str], completions: list[str], n: list) -> list[float]:
    """len(completion) + the record's `n`: a score that needs the right field for the right completion."""
    return [float(len(c) + k) for c, k in zip(completions, n)]
