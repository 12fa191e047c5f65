"""How old the trained tokens are, and whether slow samples are trained as often as fast ones: the metrics
of an async step (`async/*`).

A token's *age* is the trainer's policy version when the step starts minus the version that sampled it
(`Sample.policy_versions`); `engine.max_staleness` bounds it. A sample whose tokens came from several versions
(an in-flight weight update, `generator.inflight_update`) counts in `async/multi_version_samples`. The mean
response length of the samples trained so far against that of all the samples accepted so far shows a bias
toward short answers, which a pipeline that dropped or deferred slow samples would have.
"""

from __future__ import annotations

import torch

from rlhf_engine.data.samples import Sample


def token_age_metrics(rollouts: list[Sample], version: int, max_staleness: int) -> dict[str, float]:
    """`async/token_age/<k>`: the fraction of the response tokens of `rollouts` sampled k versions before
    `version`, for k = 0..max(max_staleness, the oldest); `async/token_age_max`; `async/multi_version_samples`:
    the share of samples whose tokens span more than one version."""
    versions = torch.cat([r.policy_versions for r in rollouts])  # [T], every response token
    ages = version - versions
    if int(ages.min()) < 0:
        raise ValueError(f"a token's policy version {int(versions.max())} is newer than the trainer's {version}")
    counts = torch.bincount(ages, minlength=max_staleness + 1)
    stats = {f"async/token_age/{k}": float(n) / ages.numel() for k, n in enumerate(counts.tolist())}
    stats["async/token_age_max"] = float(ages.max())
    stats["async/multi_version_samples"] = sum(
        int(r.policy_versions[0]) != int(r.policy_versions[-1]) for r in rollouts) / len(rollouts)
    return stats


def length_bias_metrics(trained_samples: int, trained_tokens: int, sampled_samples: int,
                        sampled_tokens: int) -> dict[str, float]:
    """The mean response length of the samples trained so far and of all accepted so far (in flight included)."""
    return {"async/response_length/trained_mean": trained_tokens / max(trained_samples, 1),
            "async/response_length/sampled_mean": sampled_tokens / max(sampled_samples, 1)}
