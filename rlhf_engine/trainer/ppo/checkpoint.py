"""A PPO trainer's checkpoint: `save_sharded` (DCP, any world size) of its trainable models and optimizer,
its run state (scheduler, KL controller, policy version, RNGs) and its HF folders.

A checkpoint directory holds `dcp/`, `state.json` + `state.safetensors` (see `rlhf_engine.distributed.dcp`)
and the trainer's models as `PPOTrainer.save_pretrained` writes them: `policy/` (the causal LM alone,
servable as is), `value_head.safetensors` (a shared-backbone critic's head) and `critic/` (a separate critic).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_engine.common.checkpoint import CheckpointError
from rlhf_engine.distributed.comm import Comm
from rlhf_engine.distributed.dcp import check_sharded, load_sharded, save_sharded

if TYPE_CHECKING:
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer

POLICY_DIR = "policy"
"""A checkpoint's policy: the causal LM alone (HF folder or PEFT adapters), servable as is."""
CRITIC_DIR = "critic"
"""A checkpoint's separate critic (HF folder with its value head), when the run has one."""


def check_checkpoint(ckpt: Path) -> None:
    """CheckpointError naming what is missing when `ckpt` is not a complete PPO checkpoint."""
    ckpt = Path(ckpt)
    if not (ckpt / POLICY_DIR).is_dir():
        raise CheckpointError(f"{ckpt} is not a complete rlhf-engine checkpoint: {POLICY_DIR}/ missing; pass a run "
                              "folder (its newest checkpoint) or one of its checkpoints/step-N folders")
    check_sharded(ckpt)


def save_trainer(comm: Comm, final: Path | None, trainer: PPOTrainer, extra: dict[str, Any]) -> Path:
    """`save_sharded` of a PPO trainer (every rank calls it; `final` and `extra` are rank 0's): its trainable
    models and optimizer to dcp/, its `run_state()` (scheduler, KL controller, version, its RNGs) as
    `extra["trainer"]`, its models' HF folders (`trainer.save_pretrained`)."""
    return save_sharded(comm, final, trainer.trainable_modules(), trainer.optimizer,
                        {**extra, "trainer": trainer.run_state()}, write_models=trainer.save_pretrained)


def load_trainer(ckpt: Path, trainer: PPOTrainer) -> dict[str, Any]:
    """Put what `save_trainer` wrote back into `trainer` on this rank, at any world size (every rank calls
    it); returns the rest of the saved `extra` (the engine's: step, data position, RNG)."""
    check_checkpoint(ckpt)
    extra = load_sharded(ckpt, trainer.trainable_modules(), trainer.optimizer)
    trainer.load_run_state(extra.pop("trainer"))
    return extra
