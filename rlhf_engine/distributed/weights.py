"""Full policy weights out of FSDP2 shards, one tensor at a time (for weight sync and HF folders)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter or state entry; a collective when sharded."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def iter_full_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, detached full tensor) for each entry of `module.state_dict()`, gathered one at a time.

    Every rank must drain the iterator (each sharded entry is an all-gather); only one gathered tensor is
    alive at a time when the consumer copies it out (e.g. into the weight-sync staging) before the next.
    """
    for name, tensor in module.state_dict().items():
        yield name, full_tensor(tensor.detach())
