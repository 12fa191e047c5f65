"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic like `rlhf_engine.checkpoint`.

A checkpoint directory holds
  dcp/               model and optimizer state, one file per rank plus metadata (reshardable: a run saved
                     at N ranks resumes at M)
  state.json         everything else (scheduler, KL controller, RNG, data position, ...), written by rank 0
  state.safetensors  with `rlhf_engine.checkpoint`'s pickle-free encoding
  <folders>/         HF folders (the policy for transformers / vLLM), written by rank 0
Rank 0 writes into a temporary sibling directory that is fsynced and renamed into place after every rank
has finished, so a crash leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlhf_engine.checkpoint import atomic_directory, flatten_state, load_state
from rlhf_engine.distributed.comm import Comm

DCP_DIR = "dcp"


def save_sharded(
    comm: Comm,
    final: Path | None,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    folders: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a checkpoint at `final` (rank 0's; the others pass None) from every rank (a collective);
    returns `final`.

    modules: the trainable models by name (every optimizer parameter must belong to one of them);
    extra: the rest of the state as a tree of tensors and JSON values (rank 0's is saved);
    folders: sub-directory -> writer, called on every rank (writers gather, rank 0 writes; see `save_hf_folder`).
    """
    if comm.is_main:
        final = Path(final)
        with atomic_directory(final) as tmp:
            _write(comm, tmp, modules, optimizer, extra, folders or {})
    else:
        _write(comm, None, modules, optimizer, extra, folders or {})
    comm.barrier()  # the rename is done: every rank may read the checkpoint
    return final


def _write(comm, tmp, modules, optimizer, extra, folders) -> None:
    path = Path(comm.broadcast_str(str(tmp) if tmp is not None else None))
    model_sd, optim_sd = get_state_dict(nn.ModuleDict(modules), optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
    for name, write in folders.items():
        write(path / name)
    if comm.is_main:
        tree, tensors = flatten_state(extra)
        save_file(tensors, str(path / "state.safetensors"))
        (path / "state.json").write_text(json.dumps(tree))
    comm.barrier()  # every rank's shard is on disk before rank 0 renames


def load_sharded(
    ckpt: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer state into this rank's (possibly sharded) models, whatever the world size of
    the run that saved it; returns the `extra` tree. Called by every rank."""
    ckpt = Path(ckpt)
    if not (ckpt / DCP_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt} is not a sharded checkpoint: {DCP_DIR}/.metadata is missing")
    container = nn.ModuleDict(modules)
    model_sd, optim_sd = get_state_dict(container, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
    set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return load_state(ckpt)


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def save_hf_folder(comm: Comm, model: nn.Module, path: Path, tokenizer: Any = None) -> None:
    """The policy as an HF folder (plus `value_head.safetensors` for a value-head model), gathered from the
    shards on every rank and written by rank 0."""
    from rlhf_engine.distributed.weights import iter_full_state
    from rlhf_engine.models.loading import causal_lm
    from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead

    lm = causal_lm(model)
    lm_state = {name: t.cpu().contiguous() for name, t in iter_full_state(lm)}
    head_state = None
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        head_state = {name: t.cpu().contiguous() for name, t in iter_full_state(model.v_head)}
    if not comm.is_main:
        return
    lm.save_pretrained(path, state_dict=lm_state)
    if head_state is not None:
        save_file(head_state, str(Path(path) / VALUE_HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
