"""Configuration of the reward-model stage."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_engine.trainer.stages.base import StageConfig


@dataclass
class RewardConfig(StageConfig):
    """Reward model: a one-label sequence classifier trained on preference pairs with the
    Bradley–Terry loss. Shared fields are documented on `StageConfig`."""

    output_dir: str = "runs/reward"
    """Where the reward model (an HF folder, the `reward_model` of `ppo`) is written."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    center_rewards_coefficient: float | None = None
    """Weight of the centering term mean((r_chosen + r_rejected)^2), which keeps rewards near zero
    (None: off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient ({self.center_rewards_coefficient}) must be >= 0 or None")
