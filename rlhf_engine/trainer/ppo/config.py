"""`PPOConfig`: every knob of a PPO run, with TRL's names and meanings, validated at construction.

Batch vocabulary (as in TRL's classic `PPOConfig`):

* `batch_size` samples (prompt + response pairs) are collected per `PPOTrainer.step` call;
* each PPO epoch shuffles them and cuts them into `mini_batch_size` slices; the gradients of
  `gradient_accumulation_steps` consecutive slices are summed into one optimizer step, so one
  optimizer step sees `backward_batch_size = mini_batch_size * gradient_accumulation_steps` samples;
* hence `batch_size` must be a multiple of `backward_batch_size`, and a step makes
  `ppo_epochs * batch_size / backward_batch_size` optimizer steps (fewer when `target_kl` stops it early).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

KL_PENALTIES = ("kl", "abs", "mse", "k3", "full")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")
OFF_POLICY_CORRECTIONS = ("tis", "decoupled", "none")
LR_SCHEDULERS = ("constant", "linear", "cosine")
FROZEN_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PPOConfig:
    """Configuration of `PPOTrainer`. Field names and defaults follow TRL's classic `PPOConfig`."""

    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = 1.41e-5
    """AdamW learning rate of the policy (and value head / critic)."""
    batch_size: int = 128
    """Samples (query + response) consumed by one `step()` call; also the dataloader's batch size."""
    mini_batch_size: int = 128
    """Samples per forward/backward slice inside a PPO epoch (and per forward pass of experience)."""
    gradient_accumulation_steps: int = 1
    """Slices whose gradients are summed into one optimizer step."""
    ppo_epochs: int = 4
    """Passes over the (shuffled) batch per `step()`."""
    max_tokens_per_microbatch: int = 0
    """Token budget of one forward/backward micro-batch (0: off, `mini_batch_size` samples each). When set,
    the experience passes and each optimizer step's `backward_batch_size` samples are cut into micro-batches
    of at most this many real tokens (query + response) each, and the loss is weighted by tokens, so the
    update does not depend on the budget. A sample longer than the budget raises ValueError at `step`."""
    packing: bool = True
    """Run the forward passes (policy, value, reference, reward model) on packed micro-batches: the samples
    concatenated without padding, position ids restarting per sample. A model that does not support it
    falls back to padding with a one-time warning."""
    share_prompts: bool = True
    """With `packing`: the samples of one query in a micro-batch share it in the packed rows (its tokens run
    once, each response attends to them and to itself only; `rlhf_engine.trainer.passes.prompt_sharing`), and each
    optimizer step's samples are ordered by query before they are cut into micro-batches, so that a group
    stays together. Same outputs, (k - 1) x query tokens fewer per group of k. Needs models whose attention
    takes a custom 4D mask (transformers' sdpa); others keep one query per sample, with a one-time warning."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value before each optimizer step (None: no clipping)."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule, stepped once per `step()` call (i.e. per PPO step, not per optimizer step)."""
    warmup_steps: int = 0
    """PPO steps of linear learning-rate warm-up."""
    total_steps: int | None = None
    """PPO steps of the whole run; required by the decaying schedules (`linear`, `cosine`)."""
    seed: int = 0
    """Seeds the trainer's own generators: sampling in `generate`, the minibatch and dataloader shuffles
    (torch's global RNG is never touched)."""

    # --- KL penalty and control --------------------------------------------------------------------
    kl_penalty: Literal["kl", "abs", "mse", "k3", "full"] = "kl"
    """Per-token KL estimator in the reward: `kl` (logp - ref), `abs` (|logp - ref|), `mse`
    (0.5 (logp - ref)^2), `k3` (exp(ref - logp) - (ref - logp) - 1), `full` (exact KL over the vocabulary
    from both models' logits; holds both [B, T, V] logit tensors of a forward chunk at once)."""
    init_kl_coef: float = 0.2
    """Initial (or, with `adap_kl_ctrl=False`, fixed) KL coefficient beta."""
    kl_in_reward: bool = True
    """Where the KL penalty acts. True (TRL's PPO): in the reward, r_t = -beta * KL_t, before the advantages.
    False (TRL's GRPOTrainer `beta`, verl's `use_kl_loss`): as a loss term beta * mean_t KL_t of the current
    policy against the reference, added to the policy loss, with `kl_penalty` `k3` (its expected gradient on
    the sampled tokens is that of KL(ref || pi); TRL's GRPOTrainer with `use_bias_correction_kl=False`, whose
    default True also multiplies it by the importance ratio: same value, another gradient — tests/oracle) or
    `mse` (that of KL(pi || ref)); `kl` and `abs`
    are refused there (the expected gradient of the log-ratio is 0, that of `abs` is biased). Then nothing
    before the update needs pi_old, so one optimizer step per PPO step needs no separate policy forward pass
    (see `old_logp_from_update`)."""
    adap_kl_ctrl: bool = True
    """Adapt beta towards `target` (Ziegler et al. 2019): beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon."""
    target: float = 6.0
    """Target of the adaptive controller: the mean over sequences of the summed per-token KL (`objective/kl`)."""
    horizon: float = 10000.0
    """Horizon of the adaptive controller, in samples."""
    target_kl: float | None = None
    """Stop the epoch loop of a step once the approximate KL between the policy before the step and the
    current policy (`ppo/policy/approxkl`, per token) of an optimizer step exceeds this (None: never).
    TRL gated this with `early_stopping` and a factor 1.5; here setting it is enough and it is compared as is."""

    # --- losses --------------------------------------------------------------------------------------
    cliprange: float = 0.2
    """PPO ratio clip epsilon: ratio is clipped to [1 - cliprange, 1 + cliprange]."""
    cliprange_value: float = 0.2
    """Value clip: new values stay within +- cliprange_value of the values at experience time."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (gae only)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= entropy_coef * mean token entropy)."""

    # --- rewards and advantages ----------------------------------------------------------------------
    gamma: float = 1.0
    """Discount factor of GAE and of the REINFORCE++ return."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch (scale only, mean kept) before computing advantages."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] before shaping (None: no clipping)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of each response that has no EOS token (None: no penalty)."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """`gae` (critic, whitened GAE), `grpo` (group-normalised returns), `rloo` (leave-one-out baseline),
    `reinforce_pp` (REINFORCE++: per-token discounted returns whitened over the batch). The critic-free
    estimators ignore the value head and `vf_coef`."""
    num_generations: int = 1
    """Completions per prompt for `grpo`/`rloo`: a batch holds `batch_size / num_generations` groups of
    consecutive samples that share a prompt."""

    # --- generation ----------------------------------------------------------------------------------
    response_length: int = 64
    """`max_new_tokens` of `PPOTrainer.generate`."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores log-probs at the same temperature (logits / temperature)."""

    # --- off-policy samples (async generator) ----------------------------------------------------------
    off_policy_correction: Literal["tis", "decoupled", "none"] = "tis"
    """With the sampler's log-probs given to `step` (pi_behaviour, per token: a sample may span several policy
    versions), the PPO ratio is clipped against pi_old (the trainer's own log-probs before the update, AReaL's
    proximal policy) and each token's policy loss is multiplied by w = pi_old / pi_behaviour: `tis` truncates
    it to min(w, tis_cap); `decoupled` is AReaL's decoupled PPO objective, which keeps w exact up to `tis_cap`
    and drops the tokens above it (weight 0; they still count in the loss's token mean, as in AReaL, so a kept
    token's gradient does not grow when others are dropped); `none` ignores the weights (reported only).
    `tis` is the default because truncation keeps every token's gradient at a bounded bias, while masking is
    unbiased on the kept tokens but discards the far-off-policy ones outright, and with many policy versions in
    flight more tokens are far off: `decoupled` then trains on less of the batch. Metrics:
    `off_policy/is_truncated_fraction` or `off_policy/is_masked_fraction`."""
    tis_cap: float = 2.0
    """The cap C on the importance weight pi_old / pi_behaviour (>= 1): `tis` truncates larger weights to C,
    `decoupled` drops their tokens (AReaL's `behav_imp_weight_cap`; `inf` drops none)."""

    # --- arithmetic ------------------------------------------------------------------------------------
    bf16: bool = False
    """The trainer's forward passes (policy, critic, reference) run under `torch.autocast` in bfloat16: matmuls
    and attention in bf16, weights, gradients, optimizer state, log-softmax and the losses in fp32 (TRL's
    `bf16`). On a CPU it pays where the CPU has AVX-512 BF16 or AMX (a warning says when it has neither: bf16
    is then emulated and slower than fp32). Log-probs and losses differ from fp32 by bf16 rounding."""

    # --- frozen models ---------------------------------------------------------------------------------
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Cast the frozen reference and reward models to this dtype (None: keep their dtype)."""
    logprobs_from_hidden: bool = False
    """Compute the policy's and reference's token log-probs (and entropies) from their final hidden states with
    the chunked `logprobs_from_hidden` op, inside the model's forward: the [tokens, V] logits are never
    materialized (at V = 151936 that is most of the activation memory), for one more LM-head matmul in the
    backward. False: the LM head's logits, then the fused `logprobs_from_logits`. A model that post-processes
    its logits (soft cap, scale) is refused with a ValueError; not with `kl_penalty='full'`, which needs logits."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                     "response_length", "num_generations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if isinstance(self.max_tokens_per_microbatch, bool) or not isinstance(self.max_tokens_per_microbatch, int) \
                or self.max_tokens_per_microbatch < 0:
            raise ValueError(f"max_tokens_per_microbatch ({self.max_tokens_per_microbatch!r}) must be an integer >= 0")
        if self.batch_size % self.backward_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * {self.gradient_accumulation_steps} "
                f"= {self.backward_batch_size})"
            )
        _check_choice("kl_penalty", self.kl_penalty, KL_PENALTIES)
        _check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _check_choice("off_policy_correction", self.off_policy_correction, OFF_POLICY_CORRECTIONS)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        if self.kl_penalty == "full" and (self.logprobs_from_hidden or not self.kl_in_reward):
            raise ValueError("kl_penalty='full' needs the logits of the experience pass: it works with "
                             "kl_in_reward=True and logprobs_from_hidden=False only (got kl_in_reward="
                             f"{self.kl_in_reward}, logprobs_from_hidden={self.logprobs_from_hidden})")
        if not self.kl_in_reward and self.kl_penalty in ("kl", "abs"):
            raise ValueError(f"kl_in_reward=False needs kl_penalty 'k3' or 'mse', got {self.kl_penalty!r}: as a loss "
                             "term the log-ratio estimator has zero expected gradient and 'abs' a biased one")
        if self.frozen_dtype is not None:
            _check_choice("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES)
        if self.advantage_estimator in GROUP_ESTIMATORS:
            if self.num_generations < 2:
                raise ValueError(
                    f"advantage_estimator={self.advantage_estimator!r} needs num_generations >= 2 "
                    f"(got {self.num_generations})"
                )
            if self.batch_size % self.num_generations:
                raise ValueError(
                    f"batch_size ({self.batch_size}) must be divisible by num_generations ({self.num_generations})"
                )
        for name in ("learning_rate", "cliprange", "cliprange_value", "temperature", "target", "horizon"):
            _check_positive(name, getattr(self, name))
        for name in ("vf_coef", "entropy_coef", "init_kl_coef"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be a finite number >= 0")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} ({value!r}) must be in [0, 1]")
        for name in ("max_grad_norm", "target_kl", "score_clip"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty ({self.missing_eos_penalty!r}) must be finite")
        if not self.tis_cap >= 1.0:
            raise ValueError(f"tis_cap ({self.tis_cap!r}) must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.lr_scheduler_type != "constant" and self.total_steps is None:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r} needs total_steps")
        if self.total_steps is not None and self.total_steps < max(1, self.warmup_steps):
            raise ValueError(
                f"total_steps ({self.total_steps}) must be >= max(1, warmup_steps ({self.warmup_steps}))"
            )

    @property
    def backward_batch_size(self) -> int:
        """Samples of one optimizer step: mini_batch_size * gradient_accumulation_steps."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def one_optimizer_step(self) -> bool:
        """True when a PPO step is one optimizer step (one epoch, one backward batch): its forward runs with the
        weights of the experience (see `ppo_update.old_logp_from_update`)."""
        return self.ppo_epochs == 1 and self.backward_batch_size == self.batch_size

    @property
    def uses_critic(self) -> bool:
        """True when advantages come from a value function (GAE)."""
        return self.advantage_estimator == "gae"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} ({value!r}) must be one of {', '.join(choices)}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} ({value!r}) must be a finite number > 0")
