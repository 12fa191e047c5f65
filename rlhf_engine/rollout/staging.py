"""A shared-memory file through which a weight update reaches vLLM's engine process.

`collective_rpc` is meant for control messages: sending tensors through it would push them
through another socket copy. Instead the generator copies the update once into a file in
/dev/shm (converting to the model dtype on the way), and the worker maps the same file and
reads the tensors in place; only the layout travels over RPC.

Layout, naming and mapping are the transport's shared-memory helpers (`transport/shm.py`):
each parameter at a 64-byte aligned offset, in the order of `expected` names; the file is
named for its owner's pid, so a run that starts removes it if its owner died.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping

import torch

from rlhf_engine.transport import shm
from rlhf_engine.transport.shm import ALIGN, map_file

__all__ = ["ALIGN", "StagedSpec", "StagingFile", "layout", "map_file", "views"]

StagedSpec = tuple[str, str, tuple[int, ...], int]
"""(name, dtype name, shape, byte offset) of one staged tensor."""


def layout(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> tuple[list[StagedSpec], int]:
    """Specs of every tensor in `shapes` stored as `dtype`, and the file size in bytes."""
    dtype_name = str(dtype).removeprefix("torch.")
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    offsets, size = shm.layout([dtype.itemsize * torch.Size(shape).numel() for shape in shapes.values()])
    return [(name, dtype_name, shape, off) for (name, shape), off in zip(shapes.items(), offsets)], size


def views(buffer: torch.Tensor, specs: list[StagedSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into `buffer` ([size] uint8) for each staged spec; no copies."""
    for name, dtype_name, shape, offset in specs:
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"staged tensor {name!r} has dtype {dtype_name!r}; expected a float dtype")
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        if offset < 0 or offset + nbytes > buffer.numel():
            raise ValueError(f"staged tensor {name!r} [{offset}, {offset + nbytes}) lies outside the {buffer.numel()}-byte file")
        yield name, buffer[offset : offset + nbytes].view(dtype).view(shape)


class StagingFile:
    """The generator's side: a /dev/shm file sized for the whole model, written once per update,
    removed by `close()` (and, if this process dies first, by the next run that starts)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, directory: str = "/dev/shm") -> None:
        self.specs, self.size = layout(shapes, dtype)
        if not os.path.isdir(directory):
            directory = tempfile.gettempdir()
        self.path = shm.create_file(directory, "staging", self.size)
        self._buffer = map_file(self.path, self.size)
        self._views = dict(views(self._buffer, self.specs))

    def write(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy every tensor into its slot (converting dtype); names were checked by the caller."""
        for name, dst in self._views.items():
            dst.copy_(named_tensors[name])

    def close(self) -> None:
        """Unmap and delete the file. Idempotent."""
        self._views = {}
        self._buffer = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
