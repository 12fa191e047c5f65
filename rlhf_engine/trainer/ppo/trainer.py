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

import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from rlhf_engine.common.dtypes import warn_if_bf16_is_emulated
from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed import Comm, DistributedConfig, check_divisible, is_sharded, shard_model
from rlhf_engine.distributed.dcp import implementation_kept
from rlhf_engine.models.end_of_turn import model_end_of_turn_ids
from rlhf_engine.models.loading import AdaptersDisabled, causal_lm, freeze, reference_model
from rlhf_engine.models.lora import is_lora, model_adapter_config
from rlhf_engine.models.reward_scoring import RewardFn, check_reward_model, function_scores, model_scores
from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead
from rlhf_engine.ops import masked_whiten
from rlhf_engine.trainer import advantages as adv
from rlhf_engine.trainer.export import save_gathered
from rlhf_engine.trainer.optim import adamw
from rlhf_engine.trainer.passes.layout import pass_layout
from rlhf_engine.trainer.passes.microbatch import rank_microbatches
from rlhf_engine.trainer.passes.packing import packed_scores
from rlhf_engine.trainer.ppo.checkpoint import CRITIC_DIR, POLICY_DIR
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import Experience, forward_experience, make_token_batch, pad_rows
from rlhf_engine.trainer.ppo.generate import sample_responses
from rlhf_engine.trainer.ppo.inputs import (
    TokenSeqs,
    as_scores,
    as_token_list,
    check_batch,
    collate_queries,
    samples_from_step_args,
)
from rlhf_engine.trainer.ppo.kl_control import make_kl_controller
from rlhf_engine.trainer.ppo.old_policy import PiOld, old_logp_from_update
from rlhf_engine.trainer.ppo.shaping import clip_scores, kl_shaped_rewards, missing_eos_penalty
from rlhf_engine.trainer.ppo.stats import PhaseTimer, step_stats
from rlhf_engine.trainer.ppo.update import ppo_update
from rlhf_engine.trainer.schedule import lr_scheduler
from rlhf_engine.transport import weights as weight_sync


class PPOTrainer:
    """PPO trainer. `model` is the policy: an `AutoModelForCausalLMWithValueHead` (shared-backbone critic), or
    any transformers causal LM when `value_model` is given or the advantage estimator is critic-free.

    ref_model: frozen reference; None means a frozen copy of the initial policy, or, when the policy's causal LM
        is a peft LoRA model (`rlhf_engine.models.lora.apply_lora`), that model with its adapters disabled
        (the frozen base, no second copy of the weights).
    reward_model / reward_fn: optional source of scores when `step` is called without them.
    value_model: a separate critic (`AutoModelForCausalLMWithValueHead`), trained alongside the policy; a value
        head on `model` is then unused.
    optimizer / lr_scheduler: default AdamW(learning_rate) and the config's schedule.
    comm / parallel: this rank of a multi-rank trainer and how its models are wrapped (FSDP2 or replicated).
        Every rank calls `step_batch` with the same global batch (`rlhf_engine.distributed.broadcast_samples`);
        each computes the experience of its share and its slice of every minibatch, and the result equals
        the single-process trainer's. Default: one process.
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
        comm: Comm | None = None,
        parallel: DistributedConfig | None = None,
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
        self.comm = comm = comm if comm is not None else Comm()
        if comm.distributed:
            check_divisible(comm.world_size, config.batch_size, config.mini_batch_size)
            if optimizer is not None or lr_scheduler is not None:
                raise ValueError("with several ranks the trainer builds its optimizer and scheduler itself "
                                 "(after sharding the models): do not pass optimizer / lr_scheduler")

        self.lora = is_lora(causal_lm(model))
        """The policy trains LoRA adapters on a frozen base (a peft model inside `model`)."""
        if comm.distributed and (self.lora or (value_model is not None and is_lora(value_model.pretrained_model))):
            raise ValueError(f"LoRA models train on one rank; this trainer has {comm.world_size}")
        self.model = model.eval()
        self.value_model = value_model.eval() if value_model is not None else None
        self.ref_model = reference_model(model, ref_model, config.frozen_dtype)
        """Frozen reference: `ref_model`, else the LoRA policy with its adapters disabled (no copy), else a
        frozen copy of the initial policy."""
        self.reward_model = None
        if reward_model is not None:
            check_reward_model(reward_model)
            self.reward_model = freeze(reward_model, config.frozen_dtype)
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        lm_config = causal_lm(model).config
        self.pad_token_id = _first_not_none(getattr(tokenizer, "pad_token_id", None), lm_config.pad_token_id)
        self.eos_token_ids = model_end_of_turn_ids(tokenizer, causal_lm(model))
        """Every id that ends a turn (the model's generation config and the tokenizer's EOS: the set vLLM stops
        at): responses are cut after the first, and `has_eos` / `missing_eos_penalty` go by it."""
        if self.pad_token_id is None:
            raise ValueError("no pad_token_id: the tokenizer and the model config both lack one")
        self.device = next(model.parameters()).device
        if config.bf16:
            warn_if_bf16_is_emulated("ppo.bf16", self.device)
        self.layout = pass_layout(config.packing, causal_lm(model), self.ref_model, value_model, self.reward_model,
                                  config.logprobs_from_hidden, config.share_prompts,
                                  torch.bfloat16 if config.bf16 else None)
        """Which forward passes run packed (`PPOConfig.packing` and what each model supports)."""
        parallel = parallel if parallel is not None else DistributedConfig()
        own_ref = None if isinstance(self.ref_model, AdaptersDisabled) else self.ref_model  # else: the policy's
        for module, trainable in ((self.model, True), (self.value_model, True), (own_ref, False),
                                  (self.reward_model, False)):
            if module is not None:  # FSDP2 / replicated on several ranks; activation checkpointing
                shard_model(module, parallel, comm, trainable=trainable)

        self.optimizer = optimizer if optimizer is not None else adamw(self.trainable_parameters(),
                                                                      lr=config.learning_rate)
        if lr_scheduler is None:
            lr_scheduler = _default_lr_scheduler(self.optimizer, config)
        self.lr_scheduler = lr_scheduler
        self.kl_ctl = make_kl_controller(config.init_kl_coef, config.adap_kl_ctrl, config.target, config.horizon)
        self.policy_version = 0
        """Number of `step` calls that changed the policy's weights."""
        self._shuffle = torch.Generator().manual_seed(config.seed)
        self._sampling = torch.Generator().manual_seed(config.seed)
        """Draws a seed per `generate` call: sampling never touches torch's global RNG."""
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
    def generate(self, query_tensors: TokenSeqs, **generation_kwargs) -> list[torch.Tensor] | torch.Tensor:
        """Sample one response per query with transformers' `generate` (in-process; see `sample_responses`:
        defaults from the config, kwargs override, each response cut after its first EOS). A 1-D tensor
        returns one tensor."""
        seed = int(torch.randint(0, 2**62, (), generator=self._sampling))
        return sample_responses(causal_lm(self.model), query_tensors, self.config, self.pad_token_id,
                                self.eos_token_ids, seed, **generation_kwargs)

    @torch.no_grad()
    def score(self, queries: TokenSeqs, responses: TokenSeqs,
              columns: Mapping[str, Sequence[Any]] | None = None,
              loss_mask: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Scores [B] of (query, response) pairs from the reward model or the reward function (with several
        ranks, each scores its share and the scores are gathered). columns: the prompt records' fields, one
        value per sample, for a reward function that takes them (`rlhf_engine.data.columns`); loss_mask: B x
        [R_i] bool, the sampled tokens of multi-turn episodes (the reward model reads a response up to the
        end of its last turn, `truncate_after_eos`)."""
        queries = as_token_list(queries, "queries")
        responses = as_token_list(responses, "responses")
        mine = self.comm.shard(len(queries))
        for name, values in (columns or {}).items():
            if len(values) != len(queries):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(queries)} samples")
        columns = {name: list(values)[mine] for name, values in (columns or {}).items()}
        masks = list(loss_mask)[mine] if loss_mask is not None else None
        return self.comm.all_gather_rows(self._score(queries[mine], responses[mine], columns, masks))

    def _score(self, queries: list[torch.Tensor], responses: list[torch.Tensor],
               columns: Mapping[str, Sequence[Any]] | None = None,
               loss_mask: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.reward_model is not None:
            # the classifier pools at the last token that is not *its* pad token: pad with that one
            pad = _first_not_none(self.reward_model.config.pad_token_id, self.pad_token_id)
            batch = make_token_batch(queries, responses, pad, self.eos_token_ids, self.device, loss_mask)
            rows = list(range(len(queries)))
            plan = rank_microbatches(rows, batch.lengths(), self.config.max_tokens_per_microbatch,
                                     self.config.mini_batch_size // self.comm.world_size, self.comm)
            scores = torch.empty(len(queries), dtype=torch.float32, device=self.device)
            for mb in plan:
                b = batch.select(torch.tensor(mb))
                scores[mb] = (packed_scores(self.reward_model, b.pack(self.layout.attention_width))
                              if self.layout.reward else
                              model_scores(self.reward_model, b.input_ids, b.attention_mask, b.position_ids))
            return scores
        if self.reward_fn is not None:
            if self.tokenizer is None:
                raise ValueError("reward_fn needs a tokenizer to decode prompts and completions")
            prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
            completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            return function_scores(self.reward_fn, prompts, completions, columns).to(self.device)
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
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> dict[str, float]:
        """One PPO step on `batch_size` samples (TRL's signature); returns the metrics.

        queries, responses: B 1-D token sequences (responses without the prompt; tokens after the first EOS
        are ignored). scores: B floats (None: from the reward model / function). behaviour_logprobs: the
        sampler's log-prob of each response token (B sequences as long as the responses, or [B, >= T]).
        policy_versions: the policy version that sampled each response (for staleness metrics).
        columns: `{field: B values}` of the prompts' records for a `reward_fn` that takes them (scores None).
        The arguments become a `SampleBatch` (every token trained) for `step_batch`, which says what happens.
        """
        batch = samples_from_step_args(queries, responses, behaviour_logprobs, policy_versions, columns)
        if scores is not None:
            batch.scores = as_scores(scores, len(batch))
        return self.step_batch(batch)

    def step_batch(self, batch: SampleBatch) -> dict[str, float]:
        """One PPO step on a `SampleBatch` of `batch_size` samples; returns the metrics.

        Only the tokens of each sample's `loss_mask` (and up to its first EOS) are trained: every loss, KL,
        reward, advantage and statistic is taken over them. Without `batch.scores` the reward model / function
        scores the samples. A sample with a non-finite score is dropped from the step (with a warning; none of
        its tokens is trained, it leaves its GRPO/RLOO group; counted in `env/nonfinite_rewards`); a batch of
        only such samples, or a non-finite loss or gradient, skips the update (with a warning) and reports
        `ppo/skipped` = 1; weights are never updated from non-finite values.
        """
        cfg = self.config
        timer = PhaseTimer()
        version_at_start = self.policy_version
        group = cfg.num_generations if cfg.advantage_estimator in ("grpo", "rloo") else None
        check_batch(batch, cfg.batch_size, group, self.policy_version)
        raw_scores = batch.scores if batch.scores is not None else self.score(batch.prompt_ids, batch.response_ids,
                                                                               batch.columns, batch.loss_mask)
        raw_scores = raw_scores.to(self.device, torch.float32)
        # a non-finite score drops its sample: none of its tokens is trained or counted, it leaves its group
        kept = torch.isfinite(raw_scores)  # [B]
        dropped = torch.nonzero(~kept).flatten().tolist()  # device sync
        if dropped:
            source = ("given scores" if batch.scores is not None else "model.reward_fn" if self.reward_fn
                      else "reward model")
            if len(dropped) == cfg.batch_size:
                return self._skip(f"non-finite scores at samples {dropped} ({source}): every sample; step skipped")
            warnings.warn(f"non-finite scores at samples {dropped} ({source}): dropped from this step",
                          RuntimeWarning, stacklevel=2)

        # 1. experience: reference log-probs, values and (unless the update's own forward gives pi_old, see
        #    `old_policy`) old log-probs: one no-grad forward of each model per micro-batch
        kl_coef = self.kl_ctl.value
        reward_kl_coef = kl_coef if cfg.kl_in_reward else 0.0  # else the KL is a loss term of the update
        shared_critic = cfg.uses_critic and self.value_model is None
        old_from_update = old_logp_from_update(cfg, reward_kl_coef, self.comm, shared_critic)
        with timer("forward_pass"):
            tokens = make_token_batch(batch.prompt_ids, batch.response_ids, self.pad_token_id, self.eos_token_ids,
                                      self.device, batch.loss_mask).drop(kept)  # dropped samples: no valid token
            lengths = tokens.lengths()
            mine = self.comm.shard(cfg.batch_size)
            rows = list(range(mine.start, mine.stop))
            if self.layout.attention_width:  # a group's samples in one micro-batch share its prompt
                rows = tokens.by_prompt(rows)
            plan = rank_microbatches(rows, lengths, cfg.max_tokens_per_microbatch,
                                     cfg.mini_batch_size // self.comm.world_size, self.comm)
            passes = forward_experience(self.model, self.ref_model, self.value_model, tokens, cfg, plan, self.comm,
                                        self.layout, policy_pass=not old_from_update)
        if not passes.all_finite():  # device syncs
            return self._skip("non-finite log-probs or values in the experience; step skipped, weights unchanged")

        # 2. rewards and advantages, over the tokens trained
        mask = tokens.loss_mask  # [B, T]
        with timer("compute_rewards"):
            step_scores = clip_scores(torch.where(kept, raw_scores, 0.0), cfg.score_clip)  # [B], 0 where dropped
            step_scores = missing_eos_penalty(step_scores, tokens.has_eos, cfg.missing_eos_penalty)
            kl = passes.kl if passes.kl is not None else torch.zeros_like(mask)  # kl_coef is 0 without it
            rewards, non_score = kl_shaped_rewards(step_scores, kl, mask, reward_kl_coef)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        with timer("compute_advantages"):
            advantages, returns = self._advantages(rewards, passes.values, mask, kept)
            behaviour = None
            if batch.behaviour_logp is not None:  # [B, T]: tokens after EOS are not trained
                behaviour = pad_rows(batch.behaviour_logp, mask.shape[1]).to(self.device)
            if old_from_update:
                pi_old = PiOld.from_update(cfg, self.comm, mask, passes.ref_logp, behaviour)
            else:
                pi_old = PiOld.from_pass(cfg, mask, passes.ref_logp, behaviour, passes.old_logp, passes.entropy, kl)
        exp = Experience(
            batch=tokens, ref_logp=passes.ref_logp, values=passes.values, kl_coef=kl_coef, raw_scores=raw_scores,
            scores=step_scores, non_score_rewards=non_score, rewards=rewards, advantages=advantages,
            returns=returns, behaviour_logp=behaviour,
        )

        # 3. epochs over shuffled minibatches, one optimizer step per backward batch
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        with timer("optimize_step"):
            update = ppo_update(self.model, self.value_model, self.optimizer, exp, pi_old, cfg, self._shuffle,
                                self.comm, lengths, self.layout)
        old = pi_old.result()  # pi_old on every token, now also when the update's forward gave it

        # 4. KL control, learning-rate schedule, policy version (the weights to publish)
        mean_kl = old.mean_kl(mask)  # device sync
        if update.optimizer_steps:
            self.policy_version += 1
        if update.non_finite:
            warnings.warn("non-finite loss or gradient norm: update stopped and undone, weights unchanged",
                          RuntimeWarning, stacklevel=2)
        else:
            self.kl_ctl.update(mean_kl, cfg.batch_size)
            self.lr_scheduler.step()

        total = timer.total()
        oldest = batch.oldest_versions()  # [B], each sample's oldest token
        staleness = version_at_start - oldest if oldest is not None else None
        return {
            **step_stats(exp, old, update, mean_kl, cfg.tis_cap, staleness),
            **timer.times,
            "time/ppo/total": total,
            "time/ppo/tokens_per_second": float(tokens.attention_mask.sum()) / total,
            "ppo/learning_rate": learning_rate,
            "ppo/optimizer_steps": float(update.optimizer_steps),
            "ppo/early_stop": float(update.early_stopped),
            "ppo/skipped": float(update.non_finite),
            "ppo/policy_version": float(self.policy_version),
        }

    def _advantages(
        self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, kept: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) [B, T] of the configured estimator; `kept` [B]: the samples not dropped."""
        cfg = self.config
        if cfg.advantage_estimator == "gae":
            return adv.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.advantage_estimator == "reinforce_pp":
            return adv.reinforce_pp_advantages(rewards, mask, cfg.gamma)
        seq_returns = adv.sequence_returns(rewards, mask)  # [B]
        if cfg.advantage_estimator == "grpo":
            seq_adv = adv.grpo_advantages(seq_returns, cfg.num_generations, valid=kept)
        else:
            seq_adv = adv.rloo_advantages(seq_returns, cfg.num_generations, valid=kept)
        return adv.broadcast_to_tokens(seq_adv, mask), adv.broadcast_to_tokens(seq_returns, mask)

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

    def policy_weights(self, *, adapters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """The one weight accessor: `(name, tensor)` of what a weight version carries, one tensor at a time at
        every world size (`transport.weights.policy_weights` on this policy). `adapters`: the LoRA adapters under
        peft's names, fp32 (what `adapter_model.safetensors` holds; RuntimeError without LoRA), all a generator
        needs each version besides the base it loaded once. Else the full weights under transformers' names, no
        value head (with LoRA merged, W + scale * B @ A); with sharded models each is gathered from the shards:
        every rank must drain the iterator (rank 0 sends). Detached tensors aliasing the live parameters where
        they can: copy them before the next `step`."""
        return weight_sync.policy_weights(self.model, adapters=adapters)

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """`dict(policy_weights())`: the full weights as one mapping (on ranks, every rank calls it)."""
        return dict(self.policy_weights())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """`dict(policy_weights(adapters=True))`: the LoRA adapters as one mapping."""
        return dict(self.policy_weights(adapters=True))

    def adapter_config(self) -> dict:
        """The policy's `adapter_config.json` as its PEFT folder holds it (LoRA only; else RuntimeError): with
        `policy_weights(adapters=True)`, what a generator needs to write a loadable adapter folder."""
        if not self.lora:
            raise RuntimeError("adapter_config: the policy has no LoRA adapters (model.lora is not set)")
        return model_adapter_config(causal_lm(self.model))

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The models the optimizer trains, by checkpoint name (for sharded checkpoints)."""
        return {"policy": self.model, **({"critic": self.value_model} if self.value_model is not None else {})}

    def run_state(self) -> dict[str, Any]:
        """Trainer state besides models and optimizer: scheduler, KL controller, version, RNGs."""
        return {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "policy_version": self.policy_version,
            "shuffle_rng": self._shuffle.get_state(),
            "sampling_rng": self._sampling.get_state(),
        }

    def load_run_state(self, state: dict[str, Any]) -> None:
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.policy_version = int(state["policy_version"])
        self._shuffle.set_state(state["shuffle_rng"])
        self._sampling.set_state(state["sampling_rng"])

    def state_dict(self) -> dict[str, Any]:
        """The optimizer and `run_state()` (models are saved with `save_pretrained`)."""
        return {"optimizer": self.optimizer.state_dict(), **self.run_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with implementation_kept(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        self.load_run_state(state)

    def save_pretrained(self, path: str | Path) -> None:
        """The trainer's models under `path` (see `rlhf_engine.common.checkpoint` for the layout): `policy/`, the
        policy's causal LM and tokenizer (loads in transformers and vLLM as is; a LoRA policy as a PEFT adapter
        folder: `adapter_config.json`, `adapter_model.safetensors`); `value_head.safetensors`, the policy's value
        head (beside `policy/`, never in it); `critic/`, a separate critic (its LM and its head).
        With sharded models every rank must call it (the weights are gathered); rank 0 writes."""
        path = Path(path)
        head_file = path / VALUE_HEAD_FILE if isinstance(self.model, AutoModelForCausalLMWithValueHead) else None
        if is_sharded(self.model):
            save_gathered(self.comm, self.model, path / POLICY_DIR, self.tokenizer, value_head_file=head_file)
            if self.value_model is not None:
                save_gathered(self.comm, self.value_model, path / CRITIC_DIR)
            return
        if head_file is not None:
            self.model.save_pretrained(path / POLICY_DIR, value_head_file=head_file)
        else:
            self.model.save_pretrained(path / POLICY_DIR)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / POLICY_DIR)
        if self.value_model is not None:
            self.value_model.save_pretrained(path / CRITIC_DIR)


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------
def _first_not_none(*values):
    return next((v for v in values if v is not None), None)


def _default_lr_scheduler(optimizer: torch.optim.Optimizer, config: PPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's schedule, stepped once per PPO step (`total_steps` only matters for the decaying ones)."""
    total = config.total_steps if config.total_steps is not None else max(1, config.warmup_steps)
    return lr_scheduler(optimizer, config.lr_scheduler_type, config.warmup_steps, total)
