"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic like `rlhf_engine.common.checkpoint`,
for any set of models and their optimizer at any world size (one process writes the same format).

A checkpoint directory holds
  dcp/               model and optimizer state, one file per rank plus metadata (reshardable: a run saved
                     at N ranks resumes at M, N and M >= 1); parameters that do not train (a LoRA base) are
                     left out (they come from the run's model folders)
  state.json         everything else (scheduler, KL controller, RNG, data position, ...), written by rank 0
  state.safetensors  with `rlhf_engine.common.checkpoint`'s pickle-free encoding
  <folders>/         whatever `write_models` writes (the trainer's HF folders), on rank 0
Rank 0 writes into a temporary sibling directory that is fsynced and renamed into place after every rank
has finished, so a crash leaves the previous checkpoint or the new one. DCP runs without a process group in
a single process.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rlhf_engine.common.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    atomic_directory,
    interrupts_held,
    load_state,
    write_state,
)
from rlhf_engine.distributed.comm import Comm

DCP_DIR = "dcp"
DCP_METADATA = ".metadata"
# frozen parameters (a LoRA base, loaded from model.policy on resume) stay out of dcp/; the model state to
# load then lacks them, hence strict=False (every key DCP is asked for must still be in the checkpoint)
log = logging.getLogger(__name__)

_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
_IMPLEMENTATION = ("fused", "foreach")
"""Optimizer param-group settings that choose how a step is computed, not what it computes."""


def check_sharded(ckpt: Path) -> None:
    """CheckpointError naming what is missing when `ckpt` is not a complete checkpoint of `save_sharded`."""
    ckpt = Path(ckpt)
    missing = [name for name in (STATE_JSON, STATE_TENSORS, f"{DCP_DIR}/{DCP_METADATA}") if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt} is not a complete rlhf-engine checkpoint: {', '.join(missing)} missing; pass "
                              "a run folder (its newest checkpoint) or one of its checkpoints/step-N folders")


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; a single-process run is meant to have none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(
    comm: Comm,
    final: Path | None,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    write_models: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint at `final` (rank 0's; the others pass None) from every rank (a collective);
    returns `final`.

    modules: the trainable models by name (every optimizer parameter must belong to one of them);
    extra: the rest of the state as a tree of tensors and JSON values (rank 0's is saved);
    write_models: writes the models' HF folders into the checkpoint folder it is given; called on every rank
    (it gathers, rank 0 writes; see `rlhf_engine.trainer.export`).
    """
    with interrupts_held():  # Ctrl-C during a save: the checkpoint is finished, then the run stops
        if comm.is_main:
            final = Path(final)
            with atomic_directory(final) as tmp:
                _write(comm, tmp, modules, optimizer, extra, write_models)
        else:
            _write(comm, None, modules, optimizer, extra, write_models)
        comm.barrier()  # the rename is done: every rank may read the checkpoint
    return final


def _write(comm, tmp, modules, optimizer, extra, write_models) -> None:
    path = Path(comm.broadcast_str(str(tmp) if tmp is not None else None))
    model_sd, optim_sd = get_state_dict(nn.ModuleDict(modules), optimizer, options=_OPTIONS)
    with _single_process_quiet(), _interrupts_pass_through():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
    if write_models is not None:
        write_models(path)
    if comm.is_main:
        write_state(path, extra)
    comm.barrier()  # every rank's shard is on disk before rank 0 renames


def load_sharded(
    ckpt: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer state into this rank's (possibly sharded) models, whatever the world size of
    the run that saved it; returns the `extra` tree. Called by every rank."""
    ckpt = Path(ckpt)
    check_sharded(ckpt)
    container = nn.ModuleDict(modules)
    model_sd, optim_sd = get_state_dict(container, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        _drop_untrained_states(optim_sd, ckpt / DCP_DIR)
        with _single_process_quiet(), _interrupts_pass_through():
            dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
        with implementation_kept(optimizer):
            set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_OPTIONS)
    except (Exception, CheckpointException) as e:  # DCP's errors name neither the folder nor the likely cause
        raise CheckpointError(
            f"{ckpt}: cannot load the model and optimizer state in {DCP_DIR}/ ({_cause(e)}); "
            "the checkpoint is damaged or was written for other models or optimizer settings (model.policy, "
            "model.value_model and model.lora must match the run that wrote it)"
        ) from e
    return load_state(ckpt)


def _drop_untrained_states(optim_sd: dict[str, Any], folder: Path) -> None:
    """Leave out of the load the optimizer states of parameters that had none when the checkpoint was written.

    `get_state_dict` on a fresh optimizer gives every trainable parameter a state (it steps once with zero
    gradients), while a trained optimizer has states only for the parameters that ever had a gradient: a
    parameter no loss reaches (a value head under GRPO, which has no critic) has none in the checkpoint, and
    asking DCP for it fails the whole load. Such a parameter then has no state after the load, as in the run
    that saved it."""
    prefix = "optim.state."
    saved = {key[len(prefix):].rsplit(".", 1)[0]
             for key in dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata if key.startswith(prefix)}
    states = optim_sd.get("state", {})
    dropped = [name for name in states if name not in saved]
    for name in dropped:
        del states[name]
    if dropped:
        log.info("%s: no optimizer state for %d parameters that never had a gradient when it was written: %s",
                 folder, len(dropped), ", ".join(dropped[:8]))


@contextmanager
def _interrupts_pass_through() -> Iterator[None]:
    """DCP wraps whatever a rank raised in a CheckpointException, Ctrl-C and SystemExit too: those come out as
    themselves, so that an interrupted load (or a save cut by a second Ctrl-C, see `interrupts_held`) stops the
    run as an interrupt (exit status 130), not as a failed checkpoint (the atomic folder leaves no partial one
    behind)."""
    try:
        yield
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise exc from e
        raise


def _cause(e: BaseException) -> str:
    """One line on what failed (for DCP's CheckpointException, a BaseException: each failed rank's error)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {rank}: {_cause(exc)}" for rank, (exc, _) in sorted(e.failures.items()))
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'no message'}"


@contextmanager
def implementation_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading an optimizer's state dict inside this block restores the checkpoint's hyperparameters but keeps
    this run's implementation (`fused`, `foreach`): `Optimizer.load_state_dict` takes every param-group setting
    from the checkpoint, so a run would otherwise inherit whether the run that saved it was fused (e.g. a
    single-process checkpoint resumed on FSDP2 ranks)."""
    kept = [{key: group[key] for key in _IMPLEMENTATION if key in group} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)
