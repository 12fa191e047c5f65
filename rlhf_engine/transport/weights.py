"""Weight sync in one place: what a weight version carries, its specs and fingerprint, their checks, the
trainer's one accessor, and how a version travels (buckets on the trainer, staging on the generator).

A version carries either the policy's full weights under transformers' names (`model.lora` unset, or
`model.lora.sync: merged`: W + scale * B @ A folded in), or with `model.lora.sync: adapters` only the
LoRA adapters under peft's saved names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
[r, in], `...lora_B.weight` [out, r]), fp32, on the frozen base every generator loads once.

- What it carries: `weight_specs(model_dir, lora)`, `(name, shape, dtype name)` rows computed from the model
  folder alone (safetensors headers; for adapters a meta-device copy wrapped by the trainer's own
  `apply_lora`, so both ends agree by construction), held as `WeightSpecs`.
- Its fingerprint: `sync_fingerprint(model_dir, lora)` (`model_fingerprint` of those specs, plus the base's
  under adapters), compared at the handshake.
- Its checks, all `WeightSpecs` methods: `check_published` (trainer, the whole version, exact dtypes),
  `check_received` (generator, each bucket's specs off the wire, exact dtypes), `check_update` (generator,
  the complete update before it is applied: names and shapes, any float dtype; backends convert).
- The accessor: `policy_weights(model, adapters=...)` yields `(name, tensor)` one at a time at every world
  size (gathered from FSDP2 shards when sharded: every rank drains it).

An update is checked in full before anything is applied, so a bad or partial one changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import torch

from rlhf_engine.common.dtypes import SAFETENSORS_DTYPES
from rlhf_engine.transport.config import CONTROL_HEADER_BYTES
from rlhf_engine.transport.wire import ALLOWED_DTYPES, DTYPE_NAMES, TensorSpec, WeightsHeader, WireError, WireLimits

if TYPE_CHECKING:
    from torch import nn

    from rlhf_engine.models.lora import LoraConfig

SpecRow = tuple[str, tuple[int, ...], str]
"""(name, shape, dtype name) of one tensor of a weight version."""

TIED_HEAD = "lm_head.weight"
"""Stored once with the embeddings when `tie_word_embeddings`; a trainer's state dict still lists it."""


# ---------------------------------------------------------------------------------------------------------------
# what a version carries
# ---------------------------------------------------------------------------------------------------------------
def stored_params(model_dir: str | Path) -> list[SpecRow]:
    """(name, shape, dtype name) of every tensor stored in `model_dir`'s safetensors files (headers
    only), plus `lm_head.weight` aliasing the embeddings when the config ties them."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out = []
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                out.append((key, tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()]))
    config = model_dir / "config.json"
    tied = config.exists() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    names = {name for name, _, _ in out}
    if tied and TIED_HEAD not in names and "model.embed_tokens.weight" in names:
        out += [(TIED_HEAD, shape, dtype) for name, shape, dtype in out if name == "model.embed_tokens.weight"]
    return out


def adapter_specs(model_dir: str | Path, lora: LoraConfig) -> list[SpecRow]:
    """(name, shape, dtype) of every adapter tensor of `lora` on the causal LM in `model_dir`, exactly
    as `policy_weights(model, adapters=True)` gives them for that model (peft names, fp32).

    Raises the `apply_lora` errors (ValueError naming `model.lora.target_modules` or `model.lora.r`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_engine.models.lora import adapter_state_dict, apply_lora

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only: no weights read, nothing allocated
        model = apply_lora(AutoModelForCausalLM.from_config(config), lora)
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in adapter_state_dict(model).items()]


def weight_specs(model_dir: str | Path, lora: LoraConfig | None) -> list[SpecRow]:
    """The tensors every weight version carries: the adapters of `lora`, or (None) all of `model_dir`'s
    stored weights in their stored dtype (`stored_params`)."""
    return adapter_specs(model_dir, lora) if lora is not None else stored_params(model_dir)


def state_dict_specs(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    """``[(name, shape, dtype)]`` of a state dict (what ``model_fingerprint`` hashes)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return [(name, tuple(t.shape), t.dtype) for name, t in items]


@dataclass(frozen=True)
class WeightSpecs:
    """The exact tensors a weight version carries: ``{name: (dtype name, shape)}``, and every check of one."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def of(cls, specs: Iterable[tuple]) -> "WeightSpecs":
        """From ``(name, shape, dtype)`` rows (dtype a ``torch.dtype`` or its name), e.g. ``weight_specs``."""
        out = {}
        for name, shape, dtype in specs:
            out[str(name)] = (DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), tuple(int(d) for d in shape))
        return cls(out)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}``, in the order the specs were given."""
        return {name: shape for name, (_, shape) in self.tensors.items()}

    def wire_specs(self) -> tuple[TensorSpec, ...]:
        """The tensors as ``TensorSpec``s, in the order they were given."""
        return tuple(TensorSpec(name, dtype, shape, torch.Size(shape).numel() * _itemsize(dtype))
                     for name, (dtype, shape) in self.tensors.items())

    def limits(self, bucket_bytes: int) -> WireLimits:
        """Limits of one weights message (a bucket of at most the whole model, or a shared-memory header)."""
        sizes = [torch.Size(shape).numel() * _itemsize(dtype) for dtype, shape in self.tensors.values()]
        header = CONTROL_HEADER_BYTES + sum(len(name) + 64 for name in self.tensors)
        return WireLimits(max_header_bytes=header, max_tensor_bytes=max(sizes, default=0),
                          max_message_bytes=sum(sizes), max_tensors=len(sizes))

    def check_published(self, specs: Sequence[TensorSpec]) -> None:
        """Trainer: raise ``ValueError`` unless ``specs`` are exactly the model's tensors (names, dtypes, shapes)."""
        got = {s.name: (s.dtype, tuple(s.shape)) for s in specs}
        if got != self.tensors:
            missing = sorted(set(self.tensors) - set(got))[:5]
            unknown = sorted(set(got) - set(self.tensors))[:5]
            differ = [f"{n}: {got[n]} != {self.tensors[n]}" for n in got if n in self.tensors and got[n] != self.tensors[n]]
            raise ValueError(f"weight update does not match the model's specs: missing {missing}, unknown {unknown}, "
                             f"different {differ[:5]}")

    def check_received(self, specs: Sequence[TensorSpec]) -> None:
        """Generator, off the wire: raise ``WireError("bad_weights")`` unless every spec is one of the model's,
        exactly."""
        for spec in specs:
            want = self.tensors.get(spec.name)
            if want is None or want != (spec.dtype, tuple(spec.shape)):
                raise WireError("bad_weights", f"tensor {spec.name!r} {spec.dtype}{list(spec.shape)}: the model has "
                                               f"{'no such tensor' if want is None else f'{want[0]}{list(want[1])}'}")

    def check_update(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """Generator, before applying: raise `ValueError` unless `named_tensors` has exactly the model's names
        with their shapes and floating-point values (any float dtype; backends convert)."""
        expected = self.shapes
        names = set(named_tensors)
        missing = sorted(set(expected) - names)
        unknown = sorted(names - set(expected))
        if missing or unknown:
            raise ValueError(
                f"weight update does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"({len(missing)}), unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''} ({len(unknown)})"
            )
        for name, tensor in named_tensors.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"weight update: {name} has shape {tuple(tensor.shape)}, the model expects {expected[name]}")
            if not tensor.is_floating_point():
                raise ValueError(f"weight update: {name} has dtype {tensor.dtype}; parameters are floating point")


def _itemsize(dtype_name: str) -> int:
    dtype = ALLOWED_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"weight dtype {dtype_name!r} is not allowed on the wire ({sorted(ALLOWED_DTYPES)})")
    return dtype.itemsize


# ---------------------------------------------------------------------------------------------------------------
# its fingerprint
# ---------------------------------------------------------------------------------------------------------------
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


def dir_fingerprint(model_dir: str | Path) -> str:
    """The `model_fingerprint` of the weights in `model_dir`: equal to the trainer's
    `model_fingerprint(policy.state_dict())` when it loaded the same folder in its stored dtype."""
    return model_fingerprint(stored_params(model_dir))


def sync_fingerprint(model_dir: str | Path, lora: LoraConfig | None) -> str:
    """The model fingerprint of a run: the base weights in `model_dir` and, with adapter sync, the
    adapter tensors too, so a generator set up for the other kind of update is refused at the
    handshake. Without `lora` it equals `dir_fingerprint(model_dir)`."""
    if lora is None:
        return dir_fingerprint(model_dir)
    return model_fingerprint(stored_params(model_dir) + adapter_specs(model_dir, lora))


# ---------------------------------------------------------------------------------------------------------------
# the trainer's accessor
# ---------------------------------------------------------------------------------------------------------------
def policy_weights(model: nn.Module, *, adapters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of what a weight version carries, one at a time at every world size.

    `model` is the trainer's policy (a causal LM, or one with a value head, which is left out). `adapters`:
    its LoRA adapters under peft's saved names, detached fp32 (`models.lora.adapter_state_dict`; a policy
    without adapters raises `RuntimeError`). Else its full weights under transformers' names: with LoRA the
    merged W + scale * B @ A (new tensors where adapted; LoRA trains on one rank); sharded (FSDP2), each
    gathered from the shards, a collective: every rank must drain the iterator. Tensors alias the live
    parameters where they can: copy them before the next optimizer step.
    """
    from rlhf_engine.distributed.weights import iter_full_state
    from rlhf_engine.models.loading import causal_lm
    from rlhf_engine.models.lora import adapter_state_dict, is_lora, merged_state_dict

    lm = causal_lm(model)
    if adapters:
        if not is_lora(lm):
            raise RuntimeError("policy_weights(adapters=True): the policy has no LoRA adapters (model.lora is not set)")
        return iter(adapter_state_dict(lm).items())
    if is_lora(lm):
        return iter(merged_state_dict(lm).items())
    return iter_full_state(lm)


# ---------------------------------------------------------------------------------------------------------------
# how it travels: buckets on the trainer, staged on the generator
# ---------------------------------------------------------------------------------------------------------------
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
