"""Direct preference optimisation (DPO, conservative DPO, IPO) with cached reference log-probs."""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_engine.data.collate import preference_batch
from rlhf_engine.data.tokenize import IGNORE_INDEX, TokenizedPair, build_preference_dataset
from rlhf_engine.models.lm_head import check_plain_lm_head, next_token_logprobs_from_hidden
from rlhf_engine.models.loading import AdaptersDisabled
from rlhf_engine.models.lora import is_lora
from rlhf_engine.ops import logprobs_from_logits
from rlhf_engine.trainer.stages.base import StageTrainer, chunks, load_causal_lm
from rlhf_engine.trainer.stages.dpo_config import DPOConfig


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [B] and implicit rewards (chosen [B], rejected [B], detached).

    Inputs are sequence log-probs [B] of the completions under the policy and the reference.
        h = (pi_c - pi_r) - (ref_c - ref_r)
        sigmoid: -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)   (eps = label_smoothing)
        ipo:     (h - 1 / (2 * beta))^2
        reward_c = beta * (pi_c - ref_c),  reward_r = beta * (pi_r - ref_r)
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type ({loss_type!r}) must be 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, batch: dict[str, torch.Tensor], *, average: bool, from_hidden: bool = False) -> torch.Tensor:
    """Log-prob of each row's labelled tokens, summed (or averaged when `average`): [rows] fp32.

    batch: `input_ids`, `attention_mask`, `labels` [rows, T] on the model's device (labels -100 on
    prompt and padding). Token t is scored from the logits at t-1 (`from_hidden`: from the hidden state at
    t-1, without logits).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]  # [rows, T-1]
    if from_hidden:
        logp = next_token_logprobs_from_hidden(model, inputs, batch["labels"])  # [rows, T-1], 0 where ignored
    else:
        logits = model(**inputs, use_cache=False).logits
        logp = logprobs_from_logits(logits[:, :-1], labels, ignore_index=IGNORE_INDEX)  # [rows, T-1]
    total = logp.sum(-1)
    if average:
        total = total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total


class DPOTrainer(StageTrainer):
    """Train a causal LM on preference pairs with DPO; `train()` then `save()`.

    The reference (`ref_model`, or `config.ref_model_name_or_path`, or a frozen copy of the initial
    policy; with `config.lora` the policy's base with adapters disabled) scores every train and eval pair
    once at construction; its log-probs are cached and the reference model is released. Metrics: loss, rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
    """

    def __init__(self, config: DPOConfig, *, model=None, ref_model=None, tokenizer=None,
                 train_dataset: Any = None, eval_dataset: Any = None) -> None:
        self._setup(config, model, tokenizer, load_causal_lm, build_preference_dataset, train_dataset, eval_dataset)
        ref = self._reference(ref_model)
        if config.logprobs_from_hidden:
            for m in (self.model, ref):
                check_plain_lm_head(m, "logprobs_from_hidden")
        self.ref_train = self._reference_logps(ref, self.train_data)  # [N, 2] chosen, rejected
        self.ref_eval = self._reference_logps(ref, self.eval_data)
        del ref

    def _reference(self, ref_model):
        if ref_model is None and self.config.ref_model_name_or_path:
            ref_model = load_causal_lm(self.config.ref_model_name_or_path, self.tokenizer)
        if ref_model is None and is_lora(self.model):  # the frozen base: the adapters disabled, no copy
            return AdaptersDisabled(self.model).eval()
        if ref_model is None:
            ref_model = copy.deepcopy(self.model)
        ref_model.to(self.device).eval().requires_grad_(False)
        return ref_model

    @property
    def _average(self) -> bool:
        return self.config.loss_type == "ipo"  # IPO works on length-averaged log-probs

    @torch.no_grad()
    def _reference_logps(self, ref_model, pairs: list[TokenizedPair]) -> torch.Tensor:
        out = []
        for batch in self._batches(pairs, self.config.per_device_eval_batch_size, None):
            with self._autocast():
                logps = sequence_logps(ref_model, self._on_device(batch), average=self._average,
                                       from_hidden=self.config.logprobs_from_hidden)  # [2B] fp32
            out.append(torch.stack(logps.chunk(2), dim=1).cpu())  # [B, 2]
        return torch.cat(out) if out else torch.empty(0, 2)

    def _batches(self, pairs: list[TokenizedPair], batch_size: int, shuffle_seed: int | None) -> list[dict]:
        order = list(range(len(pairs)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        batches = []
        for idx in chunks(order, batch_size):
            batch = preference_batch([pairs[i] for i in idx], self.tokenizer.pad_token_id)
            batch["index"] = torch.tensor(idx)
            batches.append(batch)
        return batches

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items() if k != "index"}

    def _losses(self, batch: dict[str, torch.Tensor], ref: torch.Tensor):
        with self._autocast():
            logps = sequence_logps(self.model, self._on_device(batch), average=self._average,
                                   from_hidden=self.config.logprobs_from_hidden)  # [2B] fp32
        policy_chosen, policy_rejected = logps.chunk(2)
        ref_logps = ref[batch["index"]].to(self.device)  # [B, 2] cached reference log-probs of these pairs
        losses, chosen_r, rejected_r = dpo_loss(policy_chosen, policy_rejected, ref_logps[:, 0], ref_logps[:, 1],
                                                beta=self.config.beta, loss_type=self.config.loss_type,
                                                label_smoothing=self.config.label_smoothing)
        sums = {"rewards/chosen": chosen_r.sum().item(), "rewards/rejected": rejected_r.sum().item(),
                "rewards/accuracies": (chosen_r > rejected_r).float().sum().item(),
                "rewards/margins": (chosen_r - rejected_r).sum().item(),
                "logps/chosen": policy_chosen.detach().sum().item(),
                "logps/rejected": policy_rejected.detach().sum().item()}
        return losses, sums

    def _step(self, group: list[dict]) -> dict[str, float]:
        n_total = sum(b["index"].shape[0] for b in group)
        totals: dict[str, float] = {}
        for batch in group:
            losses, sums = self._losses(batch, self.ref_train)
            (losses.sum() / n_total).backward()  # pair-weighted mean over the optimizer step
            sums["loss"] = losses.sum().item()
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / n_total for k, v in totals.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The DPO metrics on the eval pairs, prefixed `eval/`; empty dict without eval data."""
        if not self.eval_data:
            return {}
        self.model.eval()
        totals: dict[str, float] = {}
        for batch in self._batches(self.eval_data, self.config.per_device_eval_batch_size, None):
            losses, sums = self._losses(batch, self.ref_eval)
            sums["loss"] = losses.sum().item()
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        return {f"eval/{k}": v / len(self.eval_data) for k, v in totals.items()}
