"""Supervised fine-tuning: next-token cross-entropy on completion tokens, prompts masked with -100."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_engine.data.collate import pack_sequences, packed_batch, sft_batch
from rlhf_engine.data.tokenize import IGNORE_INDEX, TokenizedSFT, build_sft_dataset
from rlhf_engine.models.lm_head import check_plain_lm_head, next_token_logprobs_from_hidden
from rlhf_engine.trainer.stages.base import StageTrainer, chunks, load_causal_lm
from rlhf_engine.trainer.stages.sft_config import SFTConfig


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of scored tokens.

    logits [B, T, V], labels [B, T] (-100 = not scored). Token t is predicted from position t-1:
    loss = sum_{t>=1, labels_t != -100} -log softmax(logits_{t-1})[labels_t].
    """
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


class SFTTrainer(StageTrainer):
    """Fine-tune a causal LM on prompt/completion, chat or text data; `train()` then `save()`.

    `model`, `tokenizer`, `train_dataset`, `eval_dataset` default to the paths in `config`; a dataset
    may be a file path, a `datasets.Dataset` or a list of records.
    """

    def __init__(self, config: SFTConfig, *, model=None, tokenizer=None, train_dataset: Any = None,
                 eval_dataset: Any = None) -> None:
        self._setup(config, model, tokenizer, load_causal_lm, build_sft_dataset, train_dataset, eval_dataset)
        if self.config.logprobs_from_hidden:
            check_plain_lm_head(self.model, "logprobs_from_hidden")

    def _batches(self, examples: list[TokenizedSFT], batch_size: int, shuffle_seed: int | None) -> list[dict]:
        if shuffle_seed is not None:
            examples = list(examples)
            random.Random(shuffle_seed).shuffle(examples)
        pad = self.tokenizer.pad_token_id
        if self.config.packing:
            rows = pack_sequences(examples, self.config.max_length)
            return [packed_batch(g, pad) for g in chunks(rows, batch_size)]
        return [sft_batch(g, pad) for g in chunks(examples, batch_size)]

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        if self.config.logprobs_from_hidden:  # no [B, T, V] logits
            with self._autocast():
                logp = next_token_logprobs_from_hidden(self.model, batch, labels)  # [B, T - 1], 0 where not scored
            return -logp.sum(), (labels[:, 1:] != IGNORE_INDEX).sum()
        with self._autocast():
            # use_cache=False: with a cache, transformers ignores packed position ids when building the mask
            logits = self.model(**batch, use_cache=False).logits  # [B, T, V]
        return causal_lm_loss_sum(logits, labels)

    def _step(self, group: list[dict]) -> dict[str, float]:
        # normalise by all scored tokens of the optimizer step, so accumulation equals one big batch
        n_total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
        total = 0.0
        for batch in group:
            loss_sum, _ = self._loss_sum(batch)
            (loss_sum / n_total).backward()
            total += loss_sum.item()
        return {"loss": total / n_total, "tokens": float(n_total)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean per-token loss on the eval examples (`eval/loss`); empty dict without eval data."""
        if not self.eval_data:
            return {}
        self.model.eval()
        loss, n = 0.0, 0
        for batch in self._batches(self.eval_data, self.config.per_device_eval_batch_size, None):
            s, k = self._loss_sum(batch)
            loss, n = loss + s.item(), n + int(k)
        return {"eval/loss": loss / n, "eval/tokens": float(n)}
