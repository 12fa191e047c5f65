"""The parameters a weight update must carry, read from the model folder, and the check of an update.

Both backends take updates in HF parameter names (what the trainer's `named_parameters()`
gives). An update is checked in full before anything is applied, so a bad or partial one
changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch


def expected_params(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters stored in `model_dir`'s safetensors files (headers only)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


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
