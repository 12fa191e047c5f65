"""Metrics of a PPO step (TRL's names) and the timer of its phases."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhf_engine.ops import masked_mean, masked_var
from rlhf_engine.trainer.ppo.experience import Experience
from rlhf_engine.trainer.ppo.old_policy import OldPolicy
from rlhf_engine.trainer.ppo.update import UpdateResult


class PhaseTimer:
    """Wall-clock seconds of named phases, as `time/ppo/<phase>` metrics; `total` counts from creation."""

    def __init__(self, prefix: str = "time/ppo") -> None:
        self.prefix = prefix
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"{self.prefix}/{phase}"] = time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """How much of the returns' variance the value function explains, over the valid tokens of [B, T]:
    # EV = 1 - Var[R - V] / Var[R]
    1 is a perfect critic, 0 no better than a constant, < 0 worse; NaN when the returns are constant."""
    var_returns = float(masked_var(returns, mask, unbiased=False))  # device sync
    if var_returns == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


def step_stats(exp: Experience, old: OldPolicy, update: UpdateResult, mean_kl: float, tis_cap: float,
               staleness: torch.Tensor | None) -> dict[str, float]:
    """Metrics of a step as Python floats (one device sync each): the mean of each per-micro-batch
    metric of `update`, and the experience's rewards, KL, advantages, values and off-policy weights, over the
    trained tokens (`loss_mask`). `staleness` [B]: policy versions between sampling (each sample's oldest
    token) and this step, None when unknown. The tokens whose weight pi_old / pi_behaviour exceeds `tis_cap`
    are `off_policy/is_truncated_fraction` under `tis` and `off_policy/is_masked_fraction` under `decoupled`
    (dropped from the policy loss; their weight 0 counts in `off_policy/is_weight_mean`)."""
    mask = exp.batch.loss_mask
    finite_scores = exp.raw_scores[torch.isfinite(exp.raw_scores)]  # [B - dropped samples]
    stats = {key: float(torch.stack(values).mean()) for key, values in update.stats.items()}
    stats.update({
        "objective/kl": mean_kl,
        "objective/kl_coef": float(exp.kl_coef),
        "objective/entropy": float(masked_mean(old.entropy, mask)),
        "objective/scores": float(exp.scores.mean()),
        "env/reward_mean": float(finite_scores.mean()),
        "env/reward_std": float(finite_scores.std()) if finite_scores.numel() > 1 else 0.0,
        "env/nonfinite_rewards": float(exp.raw_scores.numel() - finite_scores.numel()),  # samples dropped
        "ppo/mean_non_score_reward": float(exp.non_score_rewards.sum(dim=1).mean()),
        "ppo/returns/mean": float(masked_mean(exp.returns, mask)),
        "ppo/policy/advantages_mean": float(masked_mean(exp.advantages, mask)),
        "tokens/response_length_mean": float(exp.batch.response_mask.sum(dim=1).mean()),
        "tokens/eos_fraction": float(exp.batch.has_eos.float().mean()),
    })
    if exp.values is not None:
        stats["ppo/val/vpred"] = float(masked_mean(exp.values, mask))
        stats["ppo/val/explained_variance"] = explained_variance(exp.values, exp.returns, mask)
    if exp.behaviour_logp is not None:
        diff = old.logp - exp.behaviour_logp
        stats["off_policy/behaviour_kl"] = float(masked_mean(diff, mask))
        if old.is_weights is not None:
            stats["off_policy/is_weight_mean"] = float(masked_mean(old.is_weights, mask))
            above_cap = (diff > math.log(tis_cap)).float()  # the test of `losses.masked_importance_weights`
            name = "is_masked_fraction" if old.correction == "decoupled" else "is_truncated_fraction"
            stats[f"off_policy/{name}"] = float(masked_mean(above_cap, mask))
    if staleness is not None:
        stats["off_policy/staleness_mean"] = float(staleness.float().mean())
        stats["off_policy/staleness_max"] = float(staleness.max())
    return stats
