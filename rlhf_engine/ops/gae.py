"""Generalized advantage estimation: `gae` (padded [B, T] with a mask) and `gae_packed`.

delta_t = r_t + gamma * V_{t+1} - V_t ; A_t = delta_t + gamma * lam * A_{t+1} ; R_t = A_t + V_t,
a reverse scan per sequence in the compiled kernel (fp32 accumulate). No gradient.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.ops._library import accum_dtype, float_dtype_check, load_library

load_library()
_ops = torch.ops.rlhf_engine


@torch.library.register_fake("rlhf_engine::gae")
def _gae_fake(rewards, values, mask, gamma, lam):
    dt = accum_dtype(rewards.dtype)
    return torch.empty_like(rewards, dtype=dt), torch.empty_like(rewards, dtype=dt)


@torch.library.register_fake("rlhf_engine::gae_packed")
def _gae_packed_fake(rewards, values, offsets, gamma, lam):
    dt = accum_dtype(rewards.dtype)
    return torch.empty_like(rewards, dtype=dt), torch.empty_like(rewards, dtype=dt)


def _check_coeff(name: str, x: float) -> None:
    if not (isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")


def _check_values(rewards: torch.Tensor, values: torch.Tensor, ndim: int, shape_doc: str) -> None:
    float_dtype_check("rewards", rewards)
    float_dtype_check("values", values)
    if rewards.dim() != ndim:
        raise ValueError(f"rewards must be {shape_doc}, got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {tuple(values.shape)} must equal rewards shape {tuple(rewards.shape)}")
    if values.dtype != rewards.dtype:
        raise TypeError(f"values dtype {values.dtype} must equal rewards dtype {rewards.dtype}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)})")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of padded sequences.

    rewards, values: [B, T] float; mask: [B, T] bool or 0/1 (None: all valid).
    Valid positions form each sequence; masked positions give 0 and are skipped (the recursion
    carries over them); the value after the last valid token is 0.
    Returns (advantages [B, T], returns [B, T]) fp32 (fp64 for fp64 inputs), without gradient.
    """
    _check_values(rewards, values, 2, "[B, T]")
    _check_coeff("gamma", gamma)
    _check_coeff("lam", lam)
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal rewards shape {tuple(rewards.shape)}")
    bool_mask = mask if mask.dtype == torch.bool else mask != 0
    return _ops.gae(
        rewards.detach().contiguous(),
        values.detach().contiguous(),
        bool_mask.contiguous(),
        float(gamma),
        float(lam),
    )


def gae_packed(
    rewards: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of sequences packed end to end.

    rewards, values: [L] float; offsets: [B + 1] integer, sequence i spans [offsets[i], offsets[i+1]),
    offsets[0] == 0, offsets[-1] == L, non-decreasing. Each sequence ends with value 0 after it.
    Returns (advantages [L], returns [L]) fp32 (fp64 for fp64 inputs), without gradient.
    """
    _check_values(rewards, values, 1, "[L]")
    _check_coeff("gamma", gamma)
    _check_coeff("lam", lam)
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool or offsets.dtype.is_complex:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be [B + 1] with B >= 0, got shape {tuple(offsets.shape)}")
    return _ops.gae_packed(
        rewards.detach().contiguous(),
        values.detach().contiguous(),
        offsets.to(torch.int64).contiguous(),
        float(gamma),
        float(lam),
    )
