"""The learning-rate schedule of every trainer: linear warmup, then linear, cosine or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at step s: linear warmup over `warmup_steps`, then `kind` decay to the end.

    warmup: (s + 1) / warmup_steps (the first step already trains); linear: 1 - progress; cosine:
    (1 + cos(pi * progress)) / 2, with progress = (s - warmup_steps) / (total_steps - warmup_steps).
    """

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return f


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                 total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` following `lr_lambda(kind, warmup_steps, total_steps)`; step it once per scheduled step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
