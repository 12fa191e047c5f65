"""One PPO step of a trainer, and the check that two ways of computing it give the same step."""

from __future__ import annotations

import pytest
import torch

STEP_KEYS = ("ppo/loss/total", "ppo/loss/policy", "objective/kl", "ppo/policy/approxkl", "ppo/grad_norm")


def step_and_weights(trainer, queries, responses, scores: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """`trainer.step(...)`'s stats and a copy of the policy's weights after it."""
    stats = trainer.step(queries, responses, scores)
    return stats, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_step(expected: tuple[dict, dict], actual: tuple[dict, dict], keys=STEP_KEYS) -> None:
    """Stats of `keys` within 1e-3 relative / 1e-5 absolute, every weight within 1e-5 / 1e-4 (fp32)."""
    (stats0, w0), (stats1, w1) = expected, actual
    for key in keys:
        assert stats1[key] == pytest.approx(stats0[key], rel=1e-3, abs=1e-5), key
    assert w1.keys() == w0.keys()
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-5, rtol=1e-4, msg=name)
