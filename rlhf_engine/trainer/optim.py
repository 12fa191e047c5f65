"""The AdamW of every trainer: torch's fused implementation where it applies (one kernel per parameter
group instead of a series of elementwise ops per tensor: an optimizer step of the 38 M benchmark model several
times faster on a CPU, see benchmarks/results/), the default one otherwise (FSDP2's sharded DTensor
parameters, devices without the fused kernel)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

_FUSED_DEVICES = ("cpu", "cuda")
_IMPLEMENTATION = ("fused", "foreach")
"""Param-group settings that choose how a step is computed, not what it computes."""


def adamw(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)`, fused when every parameter is a plain floating-point tensor on a
    CPU or CUDA device (`kwargs` must not say `fused` or `foreach`)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(
        not isinstance(p, DTensor) and p.device.type in _FUSED_DEVICES and p.dtype.is_floating_point for p in tensors
    )
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


@contextlib.contextmanager
def implementation_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading an optimizer's state dict inside this block restores the checkpoint's hyperparameters but keeps
    this run's implementation (`fused`, `foreach`): `Optimizer.load_state_dict` takes every param-group setting
    from the checkpoint, so a run would otherwise inherit whether the run that saved it was fused (e.g. a
    single-process checkpoint resumed on FSDP2 ranks)."""
    kept = [{key: group[key] for key in _IMPLEMENTATION if key in group} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)
