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
    master_addr: str
    """Host of the job's key-value store (torchrun's agent store or rank 0's)."""
    master_port: int
    attempt: str
    """This start of the job: torchrun's run id and restart count (`TORCHELASTIC_RUN_ID/RESTART_COUNT`), so
    that what one attempt wrote to the store is not read by the next."""


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
        port = int(env["MASTER_PORT"])
        restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError as e:
        raise RendezvousError(f"bad rendezvous variable: {e}") from None
    if not 0 <= rank < world:
        raise RendezvousError(f"RANK ({rank}) must lie in [0, WORLD_SIZE ({world}))")
    return RankInfo(rank=rank, world_size=world, local_rank=local, master_addr=env["MASTER_ADDR"], master_port=port,
                    attempt=f"{env.get('TORCHELASTIC_RUN_ID', 'none')}/{restart}")


def resolve_device(config: DistributedConfig, local_rank: int = 0) -> torch.device:
    """The trainer's device (`trainer.device`): `cuda` -> cuda:local_rank; `auto` -> the one a named backend
    serves (gloo: cpu, nccl: cuda), else cuda when CUDA is available, else the CPU. RuntimeError naming the
    setting when CUDA is asked for and absent."""
    if config.device == "auto":
        wants_cuda = config.backend == "nccl" or (config.backend == "auto" and torch.cuda.is_available())
    else:
        wants_cuda = config.device == "cuda"
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device='cuda' but this torch sees no CUDA device "
                           f"(torch {torch.__version__}); set trainer.device: cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"trainer rank with LOCAL_RANK {local_rank} needs cuda:{local_rank}, but this host has "
                           f"{torch.cuda.device_count()} CUDA devices: start at most that many ranks per host")
    return torch.device("cuda", local_rank)


def resolve_backend(name: str, device_type: str | None = None) -> str:
    """The process-group backend for a trainer on `device_type` (None: where CUDA decides): `auto` -> nccl for
    CUDA, gloo for the CPU; nccl without CUDA raises, and so do gloo with CUDA or nccl with a CPU trainer."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("trainer.backend='nccl' needs CUDA devices; this host has none (use gloo or auto)")
    if (name == "nccl") != (device_type == "cuda"):
        raise RuntimeError(f"trainer.backend={name!r} does not serve a trainer on {device_type} "
                           f"(trainer.device): nccl goes with cuda, gloo with cpu; or set trainer.backend: auto")
    return name


def init_process_group(config: DistributedConfig, env: Mapping[str, str] | None = None) -> tuple[RankInfo, torch.device]:
    """Join the job's process group (once per process); returns this rank and its device.

    A rank that cannot reach MASTER_ADDR:MASTER_PORT fails after `config.timeout_s` with torch's error.
    """
    info = rank_info_from_env(env)
    device = resolve_device(config, info.local_rank)
    backend = resolve_backend(config.backend, device.type)
    if device.type == "cuda":
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
