"""`Comm`: the collectives a trainer rank uses, with a world of one as the plain single-process case.

Every method is called by all ranks in the same order (they are collectives); with `world_size == 1` each
returns its input without touching torch.distributed, so the single-process trainer runs the same code.
Tensors travel on `device` (CUDA for nccl, CPU for gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Rank `rank` of `world_size` trainer ranks (the default process group)."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must lie in [0, world_size ({world_size}))")
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError(f"world_size is {world_size} but torch.distributed is not initialized")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @classmethod
    def from_process_group(cls, device: torch.device | str = "cpu") -> "Comm":
        """This rank of the initialized default process group."""
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        """True on rank 0: the rank that owns the sockets, the data position and the logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of `n` items (`n` must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"{n} items cannot be split evenly over {self.world_size} ranks")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks (a new tensor on x's device; x is not modified)."""
        if not self.distributed:
            return x
        out = x.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(x.device)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` [n, ...] (same shape on all ranks) along dim 0 -> [world * n, ...],
        in rank order."""
        if not self.distributed:
            return x
        local = x.detach().contiguous().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(x.device)

    def agree_any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one (one all-reduce): every control-flow
        decision that one rank could take alone (skip, stop, end) goes through this."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())  # device sync

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `x` on every rank with rank `src`'s `x` (same shape and dtype everywhere); returns x."""
        if not self.distributed:
            return x
        buf = x if x.device == self.device else x.to(self.device)
        dist.broadcast(buf, src=src)
        if buf is not x:
            x.copy_(buf)
        return x

    def broadcast_str(self, text: str | None, src: int = 0) -> str:
        """`text` of rank `src` on every rank (UTF-8 bytes as a uint8 tensor, its length first)."""
        data = (text or "").encode() if self.rank == src else b""
        size = self.broadcast_(torch.tensor([len(data)], dtype=torch.int64), src)
        buf = torch.tensor(list(data), dtype=torch.uint8) if self.rank == src else torch.empty(
            int(size), dtype=torch.uint8)
        return bytes(self.broadcast_(buf, src).tolist()).decode()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
