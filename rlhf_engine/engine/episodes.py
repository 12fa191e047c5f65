"""What the engine makes of the episodes it trains on: their scores and their metrics.

A sample's score is its environment's reward (`Sample.reward`); the reward function or model scores the
samples whose environment gave none (and a run without an environment, where no sample has one). A sample
whose environment failed (`EpisodeInfo.failed`: it raised, returned the wrong types or overran its time)
scores NaN, so the PPO step drops it (none of its tokens trained; counted in `env/nonfinite_rewards`).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from rlhf_engine.data.samples import Sample


def episode_scores(samples: Sequence[Sample], score: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """[B] float32 scores of `samples` (see the module docstring): `score()` gives the reward function's or
    model's scores of all B samples, called only when some sample has no reward of its own (None: there is
    neither, and such a sample scores 0). None when `score` is given and no sample has an environment's reward
    or failed (the trainer scores them all, as without an environment)."""
    if score is not None and all(s.reward is None and not s.episode.failed for s in samples):
        return None
    own = [s.reward for s in samples]
    fallback = None
    if any(r is None for r in own) and score is not None:
        fallback = score().float().cpu()
    scores = torch.tensor([r if r is not None else float(fallback[i]) if fallback is not None else 0.0
                           for i, r in enumerate(own)], dtype=torch.float32)
    failed = torch.tensor([s.episode.failed for s in samples], dtype=torch.bool)
    return torch.where(failed, torch.nan, scores)


def episode_metrics(samples: Sequence[Sample], prefix: str = "env/") -> dict[str, float]:
    """Means over `samples` of their episodes: turns, tool calls / errors / timeouts, environment seconds, the
    share of response tokens the environment wrote (masked), the share of episodes ended by each truncation
    reason, and the environment's own metrics (`EpisodeInfo.metrics`, over the episodes that report them)."""
    if not samples:
        return {}
    n = len(samples)
    tokens = sum(int(s.response_ids.numel()) for s in samples)
    masked = sum(int((~s.loss_mask).sum()) for s in samples)
    out = {
        f"{prefix}turns_mean": sum(s.episode.turns for s in samples) / n,
        f"{prefix}tool_calls_mean": sum(s.episode.tool_calls for s in samples) / n,
        f"{prefix}tool_errors_mean": sum(s.episode.tool_errors for s in samples) / n,
        f"{prefix}tool_timeouts_mean": sum(s.episode.tool_timeouts for s in samples) / n,
        f"{prefix}env_seconds_mean": sum(s.episode.env_seconds for s in samples) / n,
        f"{prefix}masked_token_share": masked / tokens if tokens else 0.0,
        f"{prefix}env_reward_share": sum(s.reward is not None for s in samples) / n,
    }
    for reason, count in sorted(Counter(s.episode.truncated for s in samples if s.episode.truncated).items()):
        out[f"{prefix}truncated/{reason}"] = count / n
    values: dict[str, list[float]] = {}
    for s in samples:
        for name, value in s.episode.metrics.items():
            values.setdefault(name, []).append(value)
    for name, vs in sorted(values.items()):
        out[f"{prefix}episode/{name}"] = sum(vs) / len(vs)
    return out
