"""The parameters a weight update must carry, read from the model folder, and the check of an update.

Both backends take full updates in HF parameter names (what the trainer's `named_parameters()`
gives); adapter updates (`rollout/adapters.py`) in peft's names. An update is checked in full before anything is applied, so a bad or partial one
changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from rlhf_engine.common.dtypes import SAFETENSORS_DTYPES

TIED_HEAD = "lm_head.weight"
"""Stored once with the embeddings when `tie_word_embeddings`; a trainer's state dict still lists it."""


def stored_params(model_dir: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
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


def dir_fingerprint(model_dir: str | Path) -> str:
    """The transport's `model_fingerprint` of the weights in `model_dir`: equal to the trainer's
    `model_fingerprint(policy.state_dict())` when it loaded the same folder in its stored dtype."""
    from rlhf_engine.transport import model_fingerprint

    return model_fingerprint(stored_params(model_dir))


def check_update(expected: Mapping[str, tuple[int, ...]], named_tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise `ValueError` unless `named_tensors` has exactly the `expected` names with their shapes,
    floating-point values (any float dtype; backends convert) and lives on the CPU or one device."""
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
