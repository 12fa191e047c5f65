"""Configuration of the DPO stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_engine.trainer.stages.base import StageConfig


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation on prompt/chosen/rejected pairs against a frozen reference
    whose log-probs are computed once before training. Shared fields are documented on `StageConfig`."""

    output_dir: str = "runs/dpo"
    """Where the trained policy (an HF folder) is written."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (DPO's beta; IPO's tau)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO's -log sigmoid(beta * h); `ipo`: (h - 1/(2 beta))^2 on length-averaged log-probs."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability that a preference label is flipped (sigmoid loss only)."""
    ref_model_name_or_path: str = ""
    """Reference model folder; empty: the initial policy (frozen copy)."""
    logprobs_from_hidden: bool = False
    """Sequence log-probs of the policy and the reference from their final hidden states with the chunked
    `logprobs_from_hidden` op: the [tokens, V] logits are never materialized. False: logits, then log-probs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta ({self.beta}) must be > 0")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type ({self.loss_type!r}) must be 'sigmoid' or 'ipo'")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing ({self.label_smoothing}) must be in [0, 0.5)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError(f"label_smoothing ({self.label_smoothing}) applies to loss_type 'sigmoid' only, not 'ipo'")
