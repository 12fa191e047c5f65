"""`PPOTrainer`: PPO for language models with four models (policy, value, reference, reward), TRL's API.

    trainer = PPOTrainer(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer, dataset=dataset)
    for batch in trainer.dataloader:
        responses = trainer.generate(batch["input_ids"])
        stats = trainer.step(batch["input_ids"], responses, scores)

The same `step` serves an asynchronous generator: it also takes the sampler's per-token log-probs and the
policy versions that produced each sample, and corrects for the difference with truncated importance
sampling (`PPOConfig.off_policy_correction`). All models run in eval mode (no dropout), so that on-policy
data gives a ratio of exactly 1 in the first minibatch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rlhf_engine.models.loading import causal_lm, freeze, frozen_copy, policy_state_dict
from rlhf_engine.models.reward_scoring import RewardFn, check_reward_model, function_scores, model_scores
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.ops import masked_mean, masked_whiten
from rlhf_engine.trainer import advantages as adv
from rlhf_engine.trainer import losses
from rlhf_engine.trainer.experience import (
    Experience,
    TokenBatch,
    TokenSeqs,
    as_behaviour_logprobs,
    as_policy_versions,
    as_scores,
    as_token_list,
    check_groups,
    forward_policy,
    forward_values,
    make_token_batch,
    truncate_after_eos,
)
from rlhf_engine.trainer.kl_control import make_kl_controller
from rlhf_engine.trainer.ppo_config import PPOConfig
from rlhf_engine.trainer.shaping import clip_scores, kl_penalty, kl_shaped_rewards, missing_eos_penalty


class PPOTrainer:
    """PPO trainer. `model` is the policy: an `AutoModelForCausalLMWithValueHead` (shared-backbone critic), or
    any transformers causal LM when `value_model` is given or the advantage estimator is critic-free.

    ref_model: frozen reference; None means a frozen copy of the initial policy.
    reward_model / reward_fn: optional source of scores when `step` is called without them.
    value_model: a separate critic (`AutoModelForCausalLMWithValueHead`), trained alongside the policy; a value
        head on `model` is then unused.
    optimizer / lr_scheduler: default AdamW(learning_rate) and the config's schedule.
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: nn.Module | None = None,
        ref_model: nn.Module | None = None,
        tokenizer: Any = None,
        dataset: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Any = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        reward_model: nn.Module | None = None,
        reward_fn: RewardFn | None = None,
        value_model: AutoModelForCausalLMWithValueHead | None = None,
    ) -> None:
        self.config = config = config if config is not None else PPOConfig()
        if model is None:
            raise ValueError("model is required (the policy)")
        if reward_model is not None and reward_fn is not None:
            raise ValueError("give reward_model or reward_fn, not both")
        if config.uses_critic and value_model is None and not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise ValueError(
                f"advantage_estimator='gae' needs a critic: model is a {type(model).__name__}; pass an "
                "AutoModelForCausalLMWithValueHead or a value_model"
            )
        if value_model is not None and not isinstance(value_model, AutoModelForCausalLMWithValueHead):
            raise ValueError(
                f"value_model must be an AutoModelForCausalLMWithValueHead, got {type(value_model).__name__}"
            )
        torch.manual_seed(config.seed)  # sampling in generate() uses torch's global RNG

        self.model = model.eval()
        self.value_model = value_model.eval() if value_model is not None else None
        self.ref_model = (
            frozen_copy(causal_lm(model), config.frozen_dtype)
            if ref_model is None
            else freeze(causal_lm(ref_model), config.frozen_dtype)
        )
        self.reward_model = None
        if reward_model is not None:
            check_reward_model(reward_model)
            self.reward_model = freeze(reward_model, config.frozen_dtype)
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        lm_config = causal_lm(model).config
        self.pad_token_id = _first_not_none(getattr(tokenizer, "pad_token_id", None), lm_config.pad_token_id)
        self.eos_token_id = _first_not_none(getattr(tokenizer, "eos_token_id", None), lm_config.eos_token_id)
        if self.pad_token_id is None:
            raise ValueError("no pad_token_id: the tokenizer and the model config both lack one")
        self.device = next(model.parameters()).device

        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(
            self.trainable_parameters(), lr=config.learning_rate
        )
        self.lr_scheduler = lr_scheduler if lr_scheduler is not None else _make_scheduler(self.optimizer, config)
        self.kl_ctl = make_kl_controller(config.init_kl_coef, config.adap_kl_ctrl, config.target, config.horizon)
        self.policy_version = 0
        """Number of `step` calls that changed the policy's weights."""
        self._shuffle = torch.Generator().manual_seed(config.seed)
        self.dataset = dataset
        self.dataloader = None
        if dataset is not None:
            self.dataloader = torch.utils.data.DataLoader(
                dataset,
                batch_size=config.batch_size,
                shuffle=True,
                drop_last=True,
                collate_fn=data_collator if data_collator is not None else collate_queries,
                generator=torch.Generator().manual_seed(config.seed),
            )

    # ------------------------------------------------------------------------------------------------
    # generation and scoring
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, query_tensors: TokenSeqs, **generation_kwargs) -> list[torch.Tensor] | torch.Tensor:
        """Sample one response per query with transformers' `generate` (in-process).

        query_tensors: a list of 1-D token tensors (or one 1-D tensor, which returns one tensor).
        Defaults: do_sample, max_new_tokens=response_length, temperature, no top-k/top-p; kwargs override.
        Returns the response tokens only, each cut after its first EOS (EOS kept).
        """
        single = isinstance(query_tensors, torch.Tensor) and query_tensors.ndim == 1
        queries = as_token_list([query_tensors] if single else query_tensors, "query_tensors")
        width = max(len(q) for q in queries)
        input_ids = torch.full((len(queries), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, q in enumerate(queries):
            input_ids[i, width - len(q) :] = q
            attention_mask[i, width - len(q) :] = 1
        kwargs = dict(
            do_sample=True,
            max_new_tokens=self.config.response_length,
            temperature=self.config.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        kwargs.update(generation_kwargs)
        out = causal_lm(self.model).generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
        )
        responses = [_cut_response(row, self.eos_token_id, self.pad_token_id) for row in out[:, width:]]
        return responses[0] if single else responses

    @torch.no_grad()
    def score(self, queries: TokenSeqs, responses: TokenSeqs) -> torch.Tensor:
        """Scores [B] of (query, response) pairs from the reward model or the reward function."""
        queries = as_token_list(queries, "queries")
        responses = as_token_list(responses, "responses")
        if self.reward_model is not None:
            # the classifier pools at the last token that is not *its* pad token: pad with that one
            pad = _first_not_none(self.reward_model.config.pad_token_id, self.pad_token_id)
            chunks = []
            for start in range(0, len(queries), self.config.mini_batch_size):
                stop = start + self.config.mini_batch_size
                b = make_token_batch(queries[start:stop], responses[start:stop], pad, self.eos_token_id, self.device)
                chunks.append(model_scores(self.reward_model, b.input_ids, b.attention_mask, b.position_ids))
            return torch.cat(chunks)
        if self.reward_fn is not None:
            if self.tokenizer is None:
                raise ValueError("reward_fn needs a tokenizer to decode prompts and completions")
            prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
            completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            return function_scores(self.reward_fn, prompts, completions).to(self.device)
        raise ValueError("scores were not given and the trainer has neither reward_model nor reward_fn")

    # ------------------------------------------------------------------------------------------------
    # the PPO step
    # ------------------------------------------------------------------------------------------------
    def step(
        self,
        queries: TokenSeqs,
        responses: TokenSeqs,
        scores: Sequence[float] | Sequence[torch.Tensor] | torch.Tensor | None = None,
        *,
        behaviour_logprobs: Sequence[torch.Tensor] | Sequence[Sequence[float]] | torch.Tensor | None = None,
        policy_versions: Sequence[int] | torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One PPO step on `batch_size` samples; returns the metrics.

        queries, responses: B 1-D token sequences (responses without the prompt; tokens after the first EOS
        are ignored). scores: B floats (None: from the reward model / function). behaviour_logprobs: the
        sampler's log-prob of each response token (B sequences as long as the responses, or [B, >= T]).
        policy_versions: the policy version that sampled each response (for staleness metrics).
        A batch with non-finite scores, or a non-finite loss or gradient, skips the update (with a warning)
        and reports `ppo/skipped` = 1; weights are never updated from non-finite values.
        """
        cfg = self.config
        timing: dict[str, float] = {}
        t_start = time.perf_counter()
        version_at_start = self.policy_version
        queries = as_token_list(queries, "queries")
        responses = as_token_list(responses, "responses")
        n = len(queries)
        if len(responses) != n:
            raise ValueError(f"got {n} queries but {len(responses)} responses")
        if n != cfg.batch_size:
            raise ValueError(f"step got {n} samples; config.batch_size is {cfg.batch_size}")
        if cfg.advantage_estimator in ("grpo", "rloo"):
            check_groups(queries, cfg.num_generations)
        raw_scores = self.score(queries, responses) if scores is None else as_scores(scores, n)
        raw_scores = raw_scores.to(self.device, torch.float32)
        behaviour = as_behaviour_logprobs(behaviour_logprobs, responses) if behaviour_logprobs is not None else None
        versions = as_policy_versions(policy_versions, n, self.policy_version) if policy_versions is not None else None
        if not bool(torch.isfinite(raw_scores).all()):  # device sync
            bad = torch.nonzero(~torch.isfinite(raw_scores)).flatten().tolist()
            return self._skip(f"non-finite scores at samples {bad}; step skipped, weights unchanged")

        # 1. experience: old log-probs, values, reference log-probs (one no-grad forward pass each)
        t0 = time.perf_counter()
        batch = make_token_batch(queries, responses, self.pad_token_id, self.eos_token_id, self.device)
        exp_parts = self._forward_experience(batch)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t0
        checked = [exp_parts[k] for k in ("old_logp", "ref_logp", "values") if k in exp_parts]
        if not all(bool(torch.isfinite(t).all()) for t in checked):  # device sync
            return self._skip("non-finite log-probs or values in the experience; step skipped, weights unchanged")

        # 2. rewards and advantages
        t0 = time.perf_counter()
        mask = batch.response_mask
        if behaviour is not None:
            behaviour = behaviour[:, : mask.shape[1]].to(self.device)  # tokens after EOS are not trained
        kl_coef = self.kl_ctl.value
        step_scores = clip_scores(raw_scores, cfg.score_clip)
        step_scores = missing_eos_penalty(step_scores, batch.has_eos, cfg.missing_eos_penalty)
        kl = exp_parts["kl"]
        rewards, non_score = kl_shaped_rewards(step_scores, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        timing["time/ppo/compute_rewards"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        advantages, returns = self._advantages(rewards, exp_parts.get("values"), mask)
        is_weights = None
        if behaviour is not None and cfg.off_policy_correction == "tis":
            is_weights = losses.truncated_importance_weights(exp_parts["old_logp"], behaviour, cfg.tis_cap) * mask
        exp = Experience(
            batch=batch,
            old_logp=exp_parts["old_logp"],
            ref_logp=exp_parts["ref_logp"],
            values=exp_parts.get("values"),
            entropy=exp_parts["entropy"],
            kl=kl,
            scores=step_scores,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            is_weights=is_weights,
        )
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t0

        # 3. epochs over shuffled minibatches, one optimizer step per backward batch
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        t0 = time.perf_counter()
        train_stats, optimizer_steps, early_stop, failure = self._optimize(exp)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t0

        # 4. KL control, learning-rate schedule, policy version (the weights to publish)
        mean_kl = float((kl * mask).sum(dim=1).mean())  # device sync
        if optimizer_steps:
            self.policy_version += 1
        if failure is None:
            self.kl_ctl.update(mean_kl, cfg.batch_size)
            self.lr_scheduler.step()
        else:
            warnings.warn(failure, RuntimeWarning, stacklevel=2)

        timing["time/ppo/total"] = time.perf_counter() - t_start
        staleness = version_at_start - versions if versions is not None else None
        stats = self._stats(exp, raw_scores, non_score, kl_coef, mean_kl, train_stats, behaviour, staleness)
        stats.update(timing)
        n_tokens = float(batch.attention_mask.sum())
        stats["time/ppo/tokens_per_second"] = n_tokens / timing["time/ppo/total"]
        stats["ppo/learning_rate"] = learning_rate
        stats["ppo/optimizer_steps"] = float(optimizer_steps)
        stats["ppo/early_stop"] = float(early_stop)
        stats["ppo/skipped"] = float(failure is not None)
        stats["ppo/policy_version"] = float(self.policy_version)
        return stats

    @torch.no_grad()
    def _forward_experience(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """old_logp, ref_logp, entropy, kl (and values) [B, T], in chunks of mini_batch_size rows."""
        cfg = self.config
        full_kl = cfg.kl_penalty == "full"
        shared_critic = cfg.uses_critic and self.value_model is None
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        width = batch.response_width
        for start in range(0, batch.input_ids.shape[0], cfg.mini_batch_size):
            rows = torch.arange(start, min(start + cfg.mini_batch_size, batch.input_ids.shape[0]))
            chunk = batch.select(rows)
            pol = forward_policy(
                self.model, chunk, cfg.temperature, with_values=shared_critic, with_entropy=True, keep_logits=full_kl
            )
            ref = forward_policy(self.ref_model, chunk, cfg.temperature, keep_logits=full_kl)
            kl = kl_penalty(
                cfg.kl_penalty, pol.logp, ref.logp, chunk.response_mask, pol.logits, ref.logits, cfg.temperature
            )
            values = pol.values
            if cfg.uses_critic and self.value_model is not None:
                values = forward_values(self.value_model, chunk)
            named = {"old_logp": pol.logp, "ref_logp": ref.logp, "entropy": pol.entropy, "kl": kl, "values": values}
            for key, tensor in named.items():
                if tensor is not None:
                    parts[key].append(_pad_right(tensor.float(), width))
        return {key: torch.cat(chunks) for key, chunks in parts.items()}

    def _advantages(
        self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.advantage_estimator == "gae":
            return adv.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.advantage_estimator == "reinforce_pp":
            return adv.reinforce_pp_advantages(rewards, mask, cfg.gamma)
        seq_returns = adv.sequence_returns(rewards, mask)  # [B]
        if cfg.advantage_estimator == "grpo":
            seq_adv = adv.grpo_advantages(seq_returns, cfg.num_generations)
        else:
            seq_adv = adv.rloo_advantages(seq_returns, cfg.num_generations)
        return adv.broadcast_to_tokens(seq_adv, mask), adv.broadcast_to_tokens(seq_returns, mask)

    def _optimize(self, exp: Experience) -> tuple[dict[str, list[float]], int, bool, str | None]:
        """PPO epochs. Returns (per-micro-batch stats, optimizer steps taken, early-stopped, failure or None)."""
        cfg = self.config
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        params = self.trainable_parameters()
        optimizer_steps = 0
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=self._shuffle)
            for b_start in range(0, cfg.batch_size, cfg.backward_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                step_kl = []
                for m_start in range(b_start, b_start + cfg.backward_batch_size, cfg.mini_batch_size):
                    rows = order[m_start : m_start + cfg.mini_batch_size]
                    loss, mb_stats = self._minibatch_loss(exp, rows)
                    if not bool(torch.isfinite(loss)):  # device sync
                        self.optimizer.zero_grad(set_to_none=True)
                        return stats, optimizer_steps, False, (
                            f"non-finite loss ({float(loss.detach())}) after {optimizer_steps} optimizer steps; "
                            "update stopped, no step taken with it"
                        )
                    (loss / cfg.gradient_accumulation_steps).backward()
                    for key, value in mb_stats.items():
                        stats[key].append(value)
                    step_kl.append(mb_stats["ppo/policy/approxkl"])
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if not bool(torch.isfinite(grad_norm)):  # device sync
                    self.optimizer.zero_grad(set_to_none=True)
                    return stats, optimizer_steps, False, (
                        f"non-finite gradient norm after {optimizer_steps} optimizer steps; "
                        "update stopped, no step taken with it"
                    )
                stats["ppo/grad_norm"].append(grad_norm.detach())
                self.optimizer.step()
                optimizer_steps += 1
                if cfg.target_kl is not None and float(torch.stack(step_kl).mean()) > cfg.target_kl:
                    self.optimizer.zero_grad(set_to_none=True)
                    return stats, optimizer_steps, True, None
        self.optimizer.zero_grad(set_to_none=True)
        return stats, optimizer_steps, False, None

    def _minibatch_loss(self, exp: Experience, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one slice of rows, with its detached stats."""
        cfg = self.config
        mb = exp.batch.select(rows)
        width = mb.response_width
        mask = mb.response_mask
        mb_old_logp = exp.old_logp[rows, :width]
        mb_advantages = exp.advantages[rows, :width]
        mb_is_weights = exp.is_weights[rows, :width] if exp.is_weights is not None else None
        shared_critic = cfg.uses_critic and self.value_model is None
        out = forward_policy(
            self.model, mb, cfg.temperature, with_values=shared_critic, with_entropy=cfg.entropy_coef > 0
        )
        pg_loss, pg_stats = losses.ppo_policy_loss(
            out.logp, mb_old_logp, mb_advantages, mask, cfg.cliprange, mb_is_weights
        )
        loss = pg_loss
        stats = {
            "ppo/loss/policy": pg_loss.detach(),
            "ppo/policy/clipfrac": pg_stats["clipfrac"],
            "ppo/policy/approxkl": pg_stats["approxkl"],
            "ppo/policy/ratio": pg_stats["ratio"],
        }
        if cfg.uses_critic:
            values = out.values if shared_critic else forward_values(self.value_model, mb)
            vf_loss, vf_stats = losses.value_loss(
                values, exp.values[rows, :width], exp.returns[rows, :width], mask, cfg.cliprange_value
            )
            loss = loss + cfg.vf_coef * vf_loss
            stats.update({
                "ppo/loss/value": vf_loss.detach(),
                "ppo/val/clipfrac": vf_stats["clipfrac"],
                "ppo/val/error": vf_stats["error"],
            })
        if cfg.entropy_coef > 0:
            entropy = losses.entropy_bonus(out.entropy, mask)
            loss = loss - cfg.entropy_coef * entropy
            stats["ppo/policy/entropy"] = entropy.detach()
        stats["ppo/loss/total"] = loss.detach()
        return loss, stats

    def _stats(
        self, exp, raw_scores, non_score, kl_coef, mean_kl, train_stats, behaviour, staleness
    ) -> dict[str, float]:
        """Metrics of a step, as Python floats (one device sync each)."""
        mask = exp.batch.response_mask
        stats = {key: float(torch.stack(values).mean()) for key, values in train_stats.items()}
        lengths = mask.sum(dim=1)
        stats.update({
            "objective/kl": mean_kl,
            "objective/kl_coef": float(kl_coef),
            "objective/entropy": float(masked_mean(exp.entropy, mask)),
            "objective/scores": float(exp.scores.mean()),
            "env/reward_mean": float(raw_scores.mean()),
            "env/reward_std": float(raw_scores.std()) if raw_scores.numel() > 1 else 0.0,
            "ppo/mean_non_score_reward": float(non_score.sum(dim=1).mean()),
            "ppo/returns/mean": float(masked_mean(exp.returns, mask)),
            "ppo/policy/advantages_mean": float(masked_mean(exp.advantages, mask)),
            "tokens/response_length_mean": float(lengths.mean()),
            "tokens/eos_fraction": float(exp.batch.has_eos.float().mean()),
        })
        if exp.values is not None:
            stats["ppo/val/vpred"] = float(masked_mean(exp.values, mask))
        if behaviour is not None:
            diff = exp.old_logp - behaviour
            stats["off_policy/behaviour_kl"] = float(masked_mean(diff, mask))
            if exp.is_weights is not None:
                stats["off_policy/is_weight_mean"] = float(masked_mean(exp.is_weights, mask))
                stats["off_policy/is_truncated_fraction"] = float(
                    masked_mean((diff > math.log(self.config.tis_cap)).float(), mask)
                )
        if staleness is not None:
            stats["off_policy/staleness_mean"] = float(staleness.float().mean())
            stats["off_policy/staleness_max"] = float(staleness.max())
        return stats

    def _skip(self, reason: str) -> dict[str, float]:
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return {"ppo/skipped": 1.0, "ppo/optimizer_steps": 0.0, "ppo/policy_version": float(self.policy_version),
                "objective/kl_coef": float(self.kl_ctl.value)}

    # ------------------------------------------------------------------------------------------------
    # what the engine needs: weights, parameters, state
    # ------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: the policy (with its value head) and the separate critic."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_model is not None:
            params += [p for p in self.value_model.parameters() if p.requires_grad]
        return params

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's current weights under transformers' names (no value head), for weight sync to a
        generator: detached tensors aliasing the live parameters (copy them before the next `step`)."""
        return policy_state_dict(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Trainer state for checkpoints (models are saved with `save_pretrained`)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "policy_version": self.policy_version,
            "shuffle_rng": self._shuffle.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.policy_version = int(state["policy_version"])
        self._shuffle.set_state(state["shuffle_rng"])

    def save_pretrained(self, path: str | Path) -> None:
        """Save the policy (HF folder + value head) to `path`, the separate critic to `path/critic`."""
        path = Path(path)
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.value_model is not None:
            self.value_model.save_pretrained(path / "critic")


# ------------------------------------------------------------------------------------------------------
# input checking and small helpers
# ------------------------------------------------------------------------------------------------------
def collate_queries(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dataloader collate: a list of dict samples -> a dict of lists, `input_ids` as 1-D int64 tensors."""
    keys = samples[0].keys()
    return {
        key: [torch.as_tensor(s[key], dtype=torch.long) if key == "input_ids" else s[key] for s in samples]
        for key in keys
    }


def _cut_response(row: torch.Tensor, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """A generated row [n] up to and including its first EOS; without EOS, trailing padding removed."""
    cut = truncate_after_eos(row, eos_token_id)
    if eos_token_id is not None and cut.numel() < row.numel():
        return cut
    keep = (row != pad_token_id).nonzero()
    return row[: int(keep[-1, 0]) + 1] if keep.numel() else row[:1]


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, t] -> [B, width] with zeros (chunks of a batch are trimmed to their own widths)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: PPOConfig):
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.total_steps
    )
