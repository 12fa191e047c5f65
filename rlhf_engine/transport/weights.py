"""Weight updates: the model fingerprint, bucketing on the trainer, staging on the generator."""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import torch

from rlhf_engine.transport.wire import DTYPE_NAMES, WeightsHeader, WireError


def model_fingerprint(model: Mapping[str, torch.Tensor] | Iterable[tuple]) -> str:
    """sha256 over sorted (name, shape, dtype): equal on both ends iff the models are compatible.

    ``model`` is a state dict ``{name: tensor}``, or an iterable of ``(name, tensor)`` or of
    ``(name, shape, dtype)`` (dtype as ``torch.dtype`` or its name, e.g. ``"bfloat16"``),
    for a side that knows the shapes without holding the tensors (e.g. from safetensors metadata).
    """
    rows = []
    for entry in (model.items() if isinstance(model, Mapping) else model):
        if len(entry) == 2:
            name, tensor = entry
            shape, dtype = tuple(tensor.shape), tensor.dtype
        else:
            name, shape, dtype = entry
        dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        rows.append((str(name), tuple(int(d) for d in shape), dtype_name))
    h = hashlib.sha256()
    for name, shape, dtype in sorted(rows):
        h.update(f"{name}|{','.join(map(str, shape))}|{dtype}\n".encode())
    return h.hexdigest()


def state_dict_specs(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    """``[(name, shape, dtype)]`` of a state dict (what ``model_fingerprint`` hashes)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return [(name, tuple(t.shape), t.dtype) for name, t in items]


def bucketize(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of about ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current, size = [], 0
    for name, tensor in named:
        n = tensor.numel() * tensor.element_size()
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += n
    if current or not buckets:
        buckets.append(current)
    return buckets


class Staging:
    """Generator side, tcp path: buckets of one version collected until all have arrived.

    ``add`` returns the complete ``{name: tensor}`` when the last bucket lands, else None.
    A bucket of a newer version discards an unfinished older one; older versions are stale.
    """

    def __init__(self, max_buckets: int) -> None:
        self._max_buckets = max_buckets
        self.version = -1
        self._num_buckets = 0
        self._buckets: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def add(self, header: WeightsHeader, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not 0 < header.num_buckets <= self._max_buckets or not 0 <= header.bucket < header.num_buckets:
            raise WireError("bad_bucket", f"bucket {header.bucket} of {header.num_buckets} (max {self._max_buckets})")
        if header.weight_version != self.version:
            self.version, self._num_buckets, self._buckets = header.weight_version, header.num_buckets, {}
        if header.num_buckets != self._num_buckets or header.bucket in self._buckets:
            raise WireError("bad_bucket", f"version {self.version}: bucket {header.bucket} of {header.num_buckets} "
                                          f"repeats or disagrees with {self._num_buckets} buckets")
        self._buckets[header.bucket] = [(s.name, t) for s, t in zip(header.tensors, tensors)]
        if len(self._buckets) < self._num_buckets:
            return None
        out: dict[str, torch.Tensor] = {}
        for i in range(self._num_buckets):
            for name, tensor in self._buckets[i]:
                if name in out:
                    self._buckets = {}
                    raise WireError("bad_bucket", f"version {self.version}: tensor {name!r} sent twice")
                out[name] = tensor
        self._buckets = {}
        return out
