"""Masked statistics over valid positions: `masked_mean`, `masked_var`, `masked_whiten` (plain torch)."""

from __future__ import annotations

import torch


def _check(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("x and mask must be torch.Tensors")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal x shape {tuple(x.shape)}")
    return mask.to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean of x over positions where mask is true: sum(x * m) / sum(m), over `dim` or all.

    x, mask: same shape (mask bool or 0/1). Positions with mask 0 do not contribute even if x is
    inf/NaN there. An empty selection gives NaN (0 / 0).
    """
    m = _check(x, mask)
    xm = torch.where(m != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return (xm * m).sum() / m.sum()
    return (xm * m).sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all positions where mask is true (scalar).

    unbiased: Bessel's correction n / (n - 1). Raises ValueError when the mask selects no element,
    or only one with unbiased=True (reads the count: a device sync).
    """
    m = _check(x, mask)
    n = int(m.sum().item())  # device sync
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} selected elements, mask selects {n}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) var over valid positions.

    shift_mean=False adds the mean back (scales only). Same shape as x; masked positions are
    transformed too (callers mask them afterwards if needed).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean
