"""`DistributedConfig`: how the trainer ranks talk and how their models are wrapped (the `trainer:` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BACKENDS = ("auto", "gloo", "nccl")
MIXED_PRECISIONS = ("no", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DistributedConfig:
    """Where the trainer runs (`device`, also for a single process) and, for N ranks under torchrun, how the
    ranks talk and how their models are wrapped (the rest, ignored by a single process)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the trainer's models (policy, critic, reference, reward model) live: `cuda` = this rank's GPU
    (cuda:LOCAL_RANK, cuda:0 for a single process), `cpu`, or `auto` (what a named `backend` serves: gloo
    cpu, nccl cuda; with `backend: auto`, cuda when CUDA is available, else cpu).
    Also for a single process: it is the trainer's device, whatever runs the generators."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: `auto` picks nccl for a CUDA trainer, gloo for a CPU one; nccl needs CUDA."""
    fsdp: bool = True
    """Shard trainable models with FSDP2 (`fully_shard` per decoder layer + root); False: replicate with DDP."""
    shard_frozen: bool = False
    """Also shard the frozen reference and reward models (FSDP2, no optimizer); False: a full copy per rank."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """`bf16`: FSDP2 computes in bf16 with fp32 gradient reduction (GPU only); `no`: fp32 throughout."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    timeout_s: float = 300.0
    """Longest wait of any collective before the job fails (a dead or unreachable rank)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"trainer.device ({self.device!r}) must be one of {', '.join(DEVICES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"trainer.backend ({self.backend!r}) must be one of {', '.join(BACKENDS)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"trainer.mixed_precision ({self.mixed_precision!r}) must be one of {', '.join(MIXED_PRECISIONS)}"
            )
        if self.mixed_precision != "no" and not self.fsdp:
            raise ValueError("trainer.mixed_precision='bf16' needs trainer.fsdp=true (DDP runs in the model's dtype)")
        if not self.timeout_s > 0:
            raise ValueError(f"trainer.timeout_s ({self.timeout_s!r}) must be > 0")


def check_divisible(world_size: int, batch_size: int, mini_batch_size: int) -> None:
    """Raise unless a global batch splits evenly over `world_size` ranks.

    Each optimizer step's minibatch (`mini_batch_size` samples per micro-batch) is cut into one equal slice
    per rank, so `mini_batch_size` (and hence `batch_size`) must be a multiple of the world size.
    """
    if world_size > batch_size:
        raise ValueError(
            f"{world_size} trainer ranks (--nproc / WORLD_SIZE) exceed ppo.batch_size ({batch_size}): "
            "each rank needs at least one sample"
        )
    if mini_batch_size % world_size:
        raise ValueError(
            f"ppo.mini_batch_size ({mini_batch_size}) must be divisible by the number of trainer ranks "
            f"({world_size}): each micro-batch is split evenly across ranks"
        )


def check_mixed_precision(config: DistributedConfig, device_type: str) -> None:
    """Raise unless the mixed precision asked for runs on `device_type` (bf16 needs CUDA)."""
    if config.mixed_precision != "no" and device_type != "cuda":
        raise ValueError(
            f"trainer.mixed_precision={config.mixed_precision!r} needs CUDA (bf16 params, fp32 reduce); "
            f"this rank runs on {device_type}: set trainer.mixed_precision: no"
        )
