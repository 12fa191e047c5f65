"""Load and freeze the models of an RLHF run: policy, reference, critic (reward models: `reward_scoring.py`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' | torch.bfloat16 | None -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def freeze(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Make `model` frozen in place: no gradients, eval mode, optionally cast to `dtype`. Returns it."""
    model.requires_grad_(False)
    model.eval()
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    return model


def frozen_copy(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """A frozen deep copy of `model` (the reference policy when none is given)."""
    return freeze(copy.deepcopy(model), dtype)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (unwraps `AutoModelForCausalLMWithValueHead`)."""
    return model.pretrained_model if isinstance(model, AutoModelForCausalLMWithValueHead) else model


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = None, frozen: bool = False) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype` (default: as saved), frozen if asked."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": resolve_dtype(dtype)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return freeze(model) if frozen else model


def policy_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under transformers' parameter names (what vLLM's `reload_weights` takes),
    without the value head: detached tensors that alias the live parameters (copy before mutating)."""
    return {name: tensor.detach() for name, tensor in causal_lm(model).state_dict().items()}
