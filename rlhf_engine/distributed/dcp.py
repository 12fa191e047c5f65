"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic like `rlhf_engine.checkpoint`: the one
checkpoint format of PPO runs, whatever their world size (a plain single-process run writes it too).

A checkpoint directory holds
  dcp/               model and optimizer state, one file per rank plus metadata (reshardable: a run saved
                     at N ranks resumes at M, N and M >= 1); parameters that do not train (a LoRA base) are
                     left out (they come from the run's model folders)
  state.json         everything else (scheduler, KL controller, RNG, data position, ...), written by rank 0
  state.safetensors  with `rlhf_engine.checkpoint`'s pickle-free encoding
  <folders>/         HF folders (the policy for transformers / vLLM), written by rank 0
Rank 0 writes into a temporary sibling directory that is fsynced and renamed into place after every rank
has finished, so a crash leaves the previous checkpoint or the new one. DCP runs without a process group in
a single process.

Older single-process runs wrote the same folder without `dcp/`, the optimizer in the state files
(`Layout.SINGLE_PROCESS`): such a checkpoint resumes on one trainer rank only (`resumable_layout`).
"""

from __future__ import annotations

import enum
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rlhf_engine.checkpoint import (STATE_JSON, STATE_TENSORS, CheckpointError, atomic_directory, interrupts_held,
                                   load_state, write_state)
from rlhf_engine.distributed.comm import Comm
from rlhf_engine.trainer.optim import implementation_kept

if TYPE_CHECKING:
    from rlhf_engine.trainer.ppo import PPOTrainer

DCP_DIR = "dcp"
DCP_METADATA = ".metadata"
POLICY_DIR = "policy"
"""A checkpoint's policy: the causal LM alone (HF folder or PEFT adapters), servable as is."""
CRITIC_DIR = "critic"
"""A checkpoint's separate critic (HF folder with its value head), when the run has one."""
# frozen parameters (a LoRA base, loaded from model.policy on resume) stay out of dcp/; the model state to
# load then lacks them, hence strict=False (every key DCP is asked for must still be in the checkpoint)
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class Layout(enum.Enum):
    """How a checkpoint stores its models and optimizer."""

    SHARDED = "sharded"  # dcp/: resumes at any world size
    SINGLE_PROCESS = "single-process"  # no dcp/, the optimizer in the state files: resumes on one rank


def checkpoint_layout(ckpt: Path) -> Layout:
    """The layout of checkpoint directory `ckpt`; CheckpointError naming what is missing when it is none."""
    ckpt = Path(ckpt)
    missing = [name for name in (POLICY_DIR, STATE_JSON, STATE_TENSORS) if not (ckpt / name).exists()]
    if (ckpt / DCP_DIR).exists() and not (ckpt / DCP_DIR / DCP_METADATA).is_file():
        missing.append(f"{DCP_DIR}/{DCP_METADATA}")
    if missing:
        raise CheckpointError(f"{ckpt} is not a complete rlhf-engine checkpoint: {', '.join(missing)} missing (a "
                              f"checkpoint holds {DCP_DIR}/, {POLICY_DIR}/, {STATE_JSON} and {STATE_TENSORS}); pass "
                              "a run folder (its newest checkpoint) or one of its checkpoints/step-N folders")
    return Layout.SHARDED if (ckpt / DCP_DIR).is_dir() else Layout.SINGLE_PROCESS


def resumable_layout(ckpt: Path, world_size: int) -> Layout:
    """`checkpoint_layout(ckpt)`, checked against the world size that resumes it: an old single-process
    checkpoint resumes on one rank only (CheckpointError saying what to do)."""
    layout = checkpoint_layout(ckpt)
    if layout is Layout.SINGLE_PROCESS and world_size > 1:
        raise CheckpointError(
            f"{ckpt} is a single-process checkpoint of an older rlhf-engine (no {DCP_DIR}/: its optimizer state "
            f"is not sharded) and cannot resume on {world_size} trainer ranks: resume it on one process first "
            "(`rlhf-engine ppo --config ... --resume ...` without --nproc); every checkpoint that run writes "
            "(engine.save_steps) is sharded and resumes at any --nproc"
        )
    return layout


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; a single-process run is meant to have none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_trainer(comm: Comm, final: Path | None, trainer: PPOTrainer, extra: dict[str, Any]) -> Path:
    """`save_sharded` of a PPO trainer (every rank calls it; `final` and `extra` are rank 0's): its trainable
    models and optimizer to dcp/, its `run_state()` (scheduler, KL controller, version, its RNGs) as
    `extra["trainer"]`, the policy's HF folder as `policy/`."""
    return save_sharded(comm, final, trainer.trainable_modules(), trainer.optimizer,
                        {**extra, "trainer": trainer.run_state()}, write_models=trainer.save_pretrained)


def load_trainer(ckpt: Path, trainer: PPOTrainer) -> dict[str, Any]:
    """Put what `save_trainer` wrote back into `trainer` on this rank, at any world size (every rank calls
    it); returns the rest of the saved `extra` (the engine's: step, data position, RNG)."""
    extra = load_sharded(ckpt, trainer.trainable_modules(), trainer.optimizer)
    trainer.load_run_state(extra.pop("trainer"))
    return extra


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
    (it gathers, rank 0 writes; see `save_hf_folder`).
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
    if checkpoint_layout(ckpt) is not Layout.SHARDED:
        raise CheckpointError(f"{ckpt} is a single-process checkpoint without {DCP_DIR}/ (see resumable_layout)")
    container = nn.ModuleDict(modules)
    model_sd, optim_sd = get_state_dict(container, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    try:
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


def save_hf_folder(comm: Comm, model: nn.Module, path: Path, tokenizer: Any = None,
                   value_head_file: Path | None = None) -> None:
    """A model as an HF folder at `path`, gathered from the shards on every rank and written by rank 0; a
    value-head model's head goes to `value_head_file` (default `path/value_head.safetensors`)."""
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
        save_file(head_state, str(value_head_file if value_head_file is not None else Path(path) / VALUE_HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
