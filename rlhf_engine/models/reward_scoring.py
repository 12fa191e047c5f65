"""Sequence rewards: a frozen `AutoModelForSequenceClassification(num_labels=1)` or a Python function."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rlhf_engine.data.columns import column_kwargs
from rlhf_engine.models.loading import freeze

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float] | torch.Tensor]
"""reward_fn(prompts, completions, **columns it names) -> one score per completion (`rlhf_engine.data.columns`)."""


def load_sequence_classifier(path: str | Path, **kwargs) -> nn.Module:
    """`AutoModelForSequenceClassification.from_pretrained(path, **kwargs)`; a causal-LM folder gets a fresh
    score head, said in one line of ours (transformers' load report of it is a warning, hidden by the CLI)."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    fresh = sorted(k for k in info["missing_keys"] if k.split(".")[0] in ("score", "classifier"))
    if fresh:
        log.info("reward head initialised fresh on top of %s (%s)", path, ", ".join(fresh))
    return model


def load_reward_model(path: str | Path, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load a reward model (sequence classifier with one label) from `path`, frozen."""
    model = load_sequence_classifier(path)
    check_reward_model(model)
    return freeze(model, dtype)


def check_reward_model(model: nn.Module) -> None:
    """Raise unless `model` is a one-label sequence classifier."""
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels != 1:
        raise ValueError(f"reward_model must have num_labels == 1 (got {num_labels})")


@torch.no_grad()
def model_scores(
    reward_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Scores [B] fp32 of sequences input_ids [B, L] (padding = the model's pad_token_id).

    transformers' sequence classifiers pool the logit at the rightmost token that is not the pad token,
    which is the last response token for any mix of left and right padding."""
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, 0].float()


def function_scores(reward_fn: RewardFn, prompts: list[str], completions: list[str],
                    columns: Mapping[str, Sequence[Any]] | None = None, setting: str = "model.reward_fn") -> torch.Tensor:
    """Call `reward_fn(prompts, completions, **the columns it takes)` (`rlhf_engine.data.columns`: one value
    per completion) and check it returns one float per completion."""
    scores = torch.as_tensor(reward_fn(prompts, completions, **column_kwargs(reward_fn, columns)),
                             dtype=torch.float32).reshape(-1)
    if scores.shape[0] != len(completions):
        name = getattr(reward_fn, "__qualname__", repr(reward_fn))
        raise ValueError(f"{setting} ({name}) returned {scores.shape[0]} scores for {len(completions)} completions")
    return scores
