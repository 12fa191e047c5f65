"""A shared-memory file through which a weight update reaches vLLM's engine process.

`collective_rpc` is meant for control messages: sending tensors through it would push them
through another socket copy. Instead the generator copies the update once into a file in
/dev/shm (converting to the model dtype on the way), and the worker maps the same file and
reads the tensors in place; only the layout travels over RPC.

Layout: each parameter at a 64-byte aligned offset, in the order of `expected` names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping

import torch

ALIGN = 64
StagedSpec = tuple[str, str, tuple[int, ...], int]
"""(name, dtype name, shape, byte offset) of one staged tensor."""


def layout(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> tuple[list[StagedSpec], int]:
    """Specs of every tensor in `shapes` stored as `dtype`, and the file size in bytes."""
    dtype_name = str(dtype).removeprefix("torch.")
    specs, offset = [], 0
    for name, shape in shapes.items():
        specs.append((name, dtype_name, tuple(shape), offset))
        nbytes = dtype.itemsize * _numel(shape)
        offset += -(-nbytes // ALIGN) * ALIGN
    return specs, max(offset, ALIGN)


def map_file(path: str, size: int) -> torch.Tensor:
    """The file at `path` mapped shared as a [size] uint8 tensor."""
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def views(buffer: torch.Tensor, specs: list[StagedSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into `buffer` ([size] uint8) for each staged spec; no copies."""
    for name, dtype_name, shape, offset in specs:
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"staged tensor {name!r} has dtype {dtype_name!r}; expected a float dtype")
        nbytes = dtype.itemsize * _numel(shape)
        if offset < 0 or offset + nbytes > buffer.numel():
            raise ValueError(f"staged tensor {name!r} [{offset}, {offset + nbytes}) lies outside the {buffer.numel()}-byte file")
        yield name, buffer[offset : offset + nbytes].view(dtype).view(shape)


class StagingFile:
    """The generator's side: a /dev/shm file sized for the whole model, written once per update."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, directory: str = "/dev/shm") -> None:
        self.specs, self.size = layout(shapes, dtype)
        if not os.path.isdir(directory):
            directory = tempfile.gettempdir()
        fd, self.path = tempfile.mkstemp(prefix="rlhf_engine_weights_", dir=directory)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
