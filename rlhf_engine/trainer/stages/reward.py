"""Reward modelling: a sequence classifier with one label, trained on preference pairs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_engine.data.collate import preference_batch
from rlhf_engine.data.tokenize import TokenizedPair, build_preference_dataset
from rlhf_engine.trainer.stages.base import StageTrainer, chunks
from rlhf_engine.trainer.stages.reward_config import RewardConfig


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """Mean Bradley–Terry loss of rewards chosen [B], rejected [B] (optional margin [B]).

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def load_reward_model_for_training(path: str | Path, tokenizer):
    """`AutoModelForSequenceClassification(num_labels=1)` from `path` (a causal-LM folder, e.g. the SFT
    output, gets a fresh score head), with `pad_token_id` set: transformers pools the logit at the last
    token that is not the pad token, so it must be known."""
    from rlhf_engine.models.reward_scoring import load_sequence_classifier

    model = load_sequence_classifier(path, num_labels=1)
    return with_pad_token(model, tokenizer)


def with_pad_token(model, tokenizer):
    """Set `model.config.pad_token_id` from the tokenizer when missing; check `num_labels == 1`."""
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model must have num_labels == 1, got {model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


class RewardTrainer(StageTrainer):
    """Train a reward model on prompt/chosen/rejected pairs (optional `margin`); `train()` then `save()`.

    `model`, `tokenizer`, `train_dataset`, `eval_dataset` default to the paths in `config`.
    Metrics: loss, accuracy (share of pairs with r_chosen > r_rejected), margin (mean r_chosen - r_rejected).
    """

    def __init__(self, config: RewardConfig, *, model=None, tokenizer=None, train_dataset: Any = None,
                 eval_dataset: Any = None) -> None:
        self._setup(config, model, tokenizer, load_reward_model_for_training, build_preference_dataset,
                    train_dataset, eval_dataset)
        self.model = with_pad_token(self.model, self.tokenizer)

    def _batches(self, pairs: list[TokenizedPair], batch_size: int, shuffle_seed: int | None) -> list[dict]:
        if shuffle_seed is not None:
            pairs = list(pairs)
            random.Random(shuffle_seed).shuffle(pairs)
        return [preference_batch(g, self.tokenizer.pad_token_id) for g in chunks(pairs, batch_size)]

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (r_chosen [B], r_rejected [B]) of a `preference_batch`, in one forward pass."""
        with self._autocast():
            scores = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device), use_cache=False).logits
        scores = scores[:, 0].float()  # [2B]
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = self.rewards(batch)
        margin = batch["margin"].to(self.device) if self._use_margin else None
        return bradley_terry_loss(chosen, rejected, margin, self.config.center_rewards_coefficient), chosen, rejected

    @property
    def _use_margin(self) -> bool:
        return any(p.margin is not None for p in self.train_data)

    def _step(self, group: list[dict]) -> dict[str, float]:
        n_total = sum(b["margin"].shape[0] for b in group)
        loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
        for batch in group:
            n = batch["margin"].shape[0]
            loss, chosen, rejected = self._loss(batch)
            (loss * (n / n_total)).backward()  # pair-weighted mean over the optimizer step
            loss_sum += loss.item() * n
            correct += (chosen > rejected).sum().item()
            margin_sum += (chosen - rejected).sum().item()
        return {"loss": loss_sum / n_total, "accuracy": correct / n_total, "margin": margin_sum / n_total}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval/loss`, `eval/accuracy`, `eval/margin` over the eval pairs; empty dict without eval data."""
        if not self.eval_data:
            return {}
        self.model.eval()
        n, loss_sum, correct, margin_sum = 0, 0.0, 0.0, 0.0
        for batch in self._batches(self.eval_data, self.config.per_device_eval_batch_size, None):
            loss, chosen, rejected = self._loss(batch)
            k = chosen.shape[0]
            n, loss_sum = n + k, loss_sum + loss.item() * k
            correct += (chosen > rejected).sum().item()
            margin_sum += (chosen - rejected).sum().item()
        return {"eval/loss": loss_sum / n, "eval/accuracy": correct / n, "eval/margin": margin_sum / n}
