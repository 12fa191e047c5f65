"""Process group from torchrun's environment: rendezvous checks, backend choice, teardown.

torchrun (and Slurm recipes built on it) exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every rank; `init_from_env` reads them once, here, and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from rlhf_engine.distributed.config import DistributedConfig

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RendezvousError(RuntimeError):
    """torchrun's environment is missing or inconsistent."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True when any rendezvous variable is set (the process expects to be one rank of many)."""
    env = os.environ if env is None else env
    return any(name in env for name in RENDEZVOUS_VARS)


def rank_info_from_env(env: Mapping[str, str] | None = None) -> RankInfo:
    """The rank of this process from torchrun's variables; a missing or bad one raises naming it."""
    env = os.environ if env is None else env
    missing = [name for name in RENDEZVOUS_VARS if name not in env]
    if missing:
        raise RendezvousError(
            f"torch.distributed rendezvous variables missing: {', '.join(missing)} (start the trainer with "
            "`rlhf-engine ppo --nproc N` or `torchrun --nproc_per_node N -m rlhf_engine ppo ...`)"
        )
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        int(env["MASTER_PORT"])
    except ValueError as e:
        raise RendezvousError(f"bad rendezvous variable: {e}") from None
    if not 0 <= rank < world:
        raise RendezvousError(f"RANK ({rank}) must lie in [0, WORLD_SIZE ({world}))")
    return RankInfo(rank=rank, world_size=world, local_rank=local)


def resolve_backend(name: str) -> str:
    """`auto` -> nccl when CUDA is available, else gloo; nccl without CUDA raises."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("trainer.backend='nccl' needs CUDA devices; this host has none (use gloo or auto)")
    return name


def init_process_group(config: DistributedConfig, env: Mapping[str, str] | None = None) -> tuple[RankInfo, torch.device]:
    """Join the job's process group (once per process); returns this rank and its device.

    A rank that cannot reach MASTER_ADDR:MASTER_PORT fails after `config.timeout_s` with torch's error.
    """
    info = rank_info_from_env(env)
    backend = resolve_backend(config.backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=config.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return info, device


def destroy_process_group() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()
