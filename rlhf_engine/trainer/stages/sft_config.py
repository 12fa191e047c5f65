"""Configuration of the SFT stage."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_engine.trainer.stages.base import StageConfig


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning: causal-LM loss on completion tokens only (prompt tokens are masked).

    Shared fields are documented on `StageConfig`; data formats in `rlhf_engine.data.formats`.
    """

    output_dir: str = "runs/sft"
    """Where the fine-tuned model (an HF folder, the input of `reward` and `ppo`) is written."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    packing: bool = False
    """Pack several sequences into rows of `max_length` tokens (position ids restart per sequence and
    attention stays within each sequence, so the loss equals the unpacked one) instead of padding."""
    logprobs_from_hidden: bool = False
    """Compute the loss from the final hidden states with the chunked `logprobs_from_hidden` op: the [tokens, V]
    logits are never materialized (one more LM-head matmul in the backward). False: logits + cross-entropy."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing and self.max_length is None:
            raise ValueError("packing=True needs max_length (the packed row length), got None")
