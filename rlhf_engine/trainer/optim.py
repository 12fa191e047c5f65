"""The AdamW of every trainer: torch's fused implementation where it applies (one kernel per parameter
group instead of a series of elementwise ops per tensor: an optimizer step of the 38 M benchmark model several
times faster on a CPU, see benchmarks/results/), the default one otherwise (FSDP2's sharded DTensor
parameters, devices without the fused kernel)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

_FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)`, fused when every parameter is a plain floating-point tensor on a
    CPU or CUDA device (`kwargs` must not say `fused` or `foreach`)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(
        not isinstance(p, DTensor) and p.device.type in _FUSED_DEVICES and p.dtype.is_floating_point for p in tensors
    )
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)
