"""Advantage estimators: GAE with a critic, and the critic-free GRPO, RLOO and REINFORCE++.

Per-token tensors are [B, T] over response tokens with `mask` 1 on valid tokens; group estimators expect
the batch as B / k groups of k consecutive samples that share a prompt.
"""

from __future__ import annotations

import torch

from rlhf_engine.ops import gae, gae_packed, masked_whiten
from rlhf_engine.ops._library import accum_dtype


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) with whitened advantages, as in PPO for RLHF.

    rewards, values, mask [B, T] -> (advantages [B, T] whitened over valid tokens, returns [B, T]).
    # delta_t = r_t + gamma * V_{t+1} - V_t            (V after the last token = 0)
    # A_t = delta_t + gamma * lam * A_{t+1}
    # R_t = A_t + V_t                                   (the value target, not whitened)
    """
    advantages, returns = gae_on_valid_tokens(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask) * mask, returns


def gae_on_valid_tokens(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` of [B, T] tensors computed on their valid tokens only, packed end to end (`gae_packed`): the scan
    touches the N = mask.sum() response tokens instead of B * T padded positions (with responses of 8 to 128
    tokens, N is about half of B * T). Equal to `gae(rewards, values, mask, ...)`, which skips masked positions
    the same way. Returns (advantages [B, T], returns [B, T]) fp32 (fp64 for fp64 inputs), 0 on padding."""
    valid = mask.bool()
    offsets = torch.zeros(valid.shape[0] + 1, dtype=torch.int64, device=valid.device)
    torch.cumsum(valid.sum(dim=1), dim=0, out=offsets[1:])  # sequence i spans [offsets[i], offsets[i + 1])
    advantages = torch.zeros(valid.shape, dtype=accum_dtype(rewards.dtype), device=valid.device)
    returns = torch.zeros_like(advantages)
    if not valid.any():  # every sample dropped: nothing to scan (a device sync, as is the boolean indexing)
        return advantages, returns
    packed_adv, packed_ret = gae_packed(rewards[valid], values[valid], offsets, gamma, lam)  # [N]
    advantages[valid], returns[valid] = packed_adv, packed_ret
    return advantages, returns


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of each sequence: rewards, mask [B, T] -> [B] (score - kl_coef * sum KL)."""
    return (rewards * mask).sum(dim=1)


def grpo_advantages(returns: torch.Tensor, num_generations: int, eps: float = 1e-4,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Group-normalised advantages of GRPO (Shao et al. 2024).

    returns [B] with B = G * k -> advantages [B]:
    # A_i = (R_i - mean_group(R)) / (std_group(R) + eps)      (std with Bessel's correction)
    valid [B] bool (None: all): the samples that count; mean and std are over a group's valid samples, and
    an invalid sample, or any sample of a group with fewer than 2 valid ones, gets A = 0.
    """
    grouped = _grouped(returns, num_generations)  # [G, k]
    v = _grouped_valid(valid, grouped)  # [G, k]
    n = v.sum(dim=1, keepdim=True)  # [G, 1]
    mean = (grouped * v).sum(dim=1, keepdim=True) / n.clamp(min=1)
    std = ((((grouped - mean) * v) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    adv = (grouped - mean) / (std + eps)
    return torch.where((v > 0) & (n >= 2), adv, torch.zeros_like(adv)).reshape(-1)  # [B]


def rloo_advantages(returns: torch.Tensor, num_generations: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    returns [B] with B = G * k -> advantages [B]:
    # A_i = R_i - (sum_group(R) - R_i) / (k - 1)
    valid [B] bool (None: all): sums and k are over a group's valid samples; an invalid sample, or any sample
    of a group with fewer than 2 valid ones, gets A = 0.
    """
    grouped = _grouped(returns, num_generations)  # [G, k]
    v = _grouped_valid(valid, grouped)  # [G, k]
    n = v.sum(dim=1, keepdim=True)  # [G, 1]
    baseline = ((grouped * v).sum(dim=1, keepdim=True) - grouped) / (n - 1).clamp(min=1)
    adv = grouped - baseline
    return torch.where((v > 0) & (n >= 2), adv, torch.zeros_like(adv)).reshape(-1)  # [B]


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): per-token discounted returns, whitened over the whole batch.

    rewards, mask [B, T] -> (advantages [B, T], returns [B, T]):
    # G_t = sum_{s >= t} gamma^(s - t) r_s        (GAE with V = 0 and lam = 1)
    # A_t = (G_t - mean(G)) / std(G)              over all valid tokens of the batch
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return masked_whiten(returns, mask) * mask, returns


def broadcast_to_tokens(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, T]: the value of each sequence at each of its valid tokens, 0 on padding."""
    return sequence_values[:, None].to(torch.float32) * mask


def _grouped_valid(valid: torch.Tensor | None, grouped: torch.Tensor) -> torch.Tensor:
    """valid [B] bool (None: all) as 0/1 floats shaped like `grouped` [G, k]."""
    if valid is None:
        return torch.ones_like(grouped)
    return valid.to(grouped.device, torch.float32).reshape(grouped.shape)


def _grouped(returns: torch.Tensor, k: int) -> torch.Tensor:
    if returns.ndim != 1 or returns.shape[0] % k:
        raise ValueError(f"returns of shape {tuple(returns.shape)} cannot be split into groups of {k}")
    return returns.to(torch.float32).reshape(-1, k)  # [G, k]
