"""Wrap the trainer's models for N ranks: FSDP2 (`fully_shard`) or replicated with gradient all-reduce.

FSDP2 layout: each decoder layer (the classes a transformers model lists in `_no_split_modules`) is its
own `fully_shard` unit, then the causal LM itself. For `AutoModelForCausalLMWithValueHead` the causal LM
and the value head are sharded as two separate roots rather than under the wrapper, because the trainer
also calls `model.pretrained_model` directly (an FSDP2 child called without its root fails).

Replicated mode (`fsdp: false`, DDP semantics): every rank keeps full parameters and `reduce_gradients`
averages the gradients over ranks before clipping — no module wrapper, so parameter names and direct
sub-module calls stay as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rlhf_engine.distributed.comm import Comm
from rlhf_engine.distributed.config import DistributedConfig, check_mixed_precision


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model: modules whose class is in its `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} lists no _no_split_modules: cannot find its decoder layers")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no module of the classes {sorted(names)}")
    return layers


def _transformers_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models to shard as roots, plus the value head as its own root when present."""
    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead

    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return [model.pretrained_model, model.v_head]
    return [model]


def _mixed_precision(config: DistributedConfig, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    check_mixed_precision(config, device.type)
    if config.mixed_precision == "no":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def sync_module_states(comm: Comm, model: nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's (ranks start from identical weights)."""
    if not comm.distributed:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            comm.broadcast_(tensor.data)


def shard_model(model: nn.Module, config: DistributedConfig, comm: Comm, *, trainable: bool = True) -> nn.Module:
    """Prepare `model` (in place) for training on `comm.world_size` ranks and return it.

    trainable=False (reference and reward models) shards only when `config.shard_frozen`, else leaves a full
    copy on each rank. One rank: only activation checkpointing applies.
    """
    check_mixed_precision(config, next(model.parameters()).device.type)  # also for a single rank
    if config.activation_checkpointing and trainable:
        from torch.distributed._composable import checkpoint

        for root in _transformers_models(model):
            if hasattr(root, "_no_split_modules"):
                for layer in decoder_layers(root):
                    checkpoint(layer)
    if not comm.distributed:
        return model
    sync_module_states(comm, model)
    if not config.fsdp or (not trainable and not config.shard_frozen):
        return model
    from torch.distributed.fsdp import fully_shard

    policy = _mixed_precision(config, comm.device)
    for root in _transformers_models(model):
        if hasattr(root, "_no_split_modules"):
            for layer in decoder_layers(root):
                fully_shard(layer, mp_policy=policy)
        fully_shard(root, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when `model` holds FSDP2 (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def reduce_gradients(comm: Comm, params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated (non-FSDP) parameters over ranks, in one flat buffer per dtype
    (FSDP2 parameters are skipped: their reduce-scatter already ran in backward)."""
    if not comm.distributed:
        return
    from torch.distributed.tensor import DTensor

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and not isinstance(p, DTensor):
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).to(comm.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= comm.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def clip_grad_norm(comm: Comm, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients of all ranks (sharded and replicated), then scale them so the norm is
    at most `max_norm` (coefficient max_norm / (norm + 1e-6), as `torch.nn.utils.clip_grad_norm_`).

    Returns the norm before clipping, equal on every rank.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32, device=comm.device)
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    # sum of squares: shards add up over ranks, replicated gradients count once
    sharded_sq = sum((g.float().pow(2).sum() for g in sharded), zero)
    replicated_sq = sum((g.float().pow(2).sum() for g in replicated), zero)
    norm = (comm.all_reduce_sum(sharded_sq) + replicated_sq).sqrt()
    if max_norm < float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm
