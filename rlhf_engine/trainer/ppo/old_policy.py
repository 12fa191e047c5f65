"""pi_old, the policy the PPO ratio divides by: where its log-probs come from, decided and supplied here only.

pi_old is the trainer's policy at experience time. Usually a no-grad policy pass at experience time gives
its log-probs. When the update is one optimizer step (`ppo_epochs == 1` and `backward_batch_size ==
batch_size`), the update's own forward runs with exactly those weights, so its detached log-probs are the
same numbers, for fresh and stale samples alike, and the policy pass can be skipped (a measured win: one
policy forward fewer per step). `PiOld` hides which: the update asks it for each minibatch's old
log-probs and importance weights, and after the update it gives the step's `OldPolicy` for the metrics and
the KL controller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine.distributed import Comm
from rlhf_engine.trainer import losses
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.shaping import kl_penalty


@dataclass(frozen=True)
class OldPolicy:
    """pi_old on a step's tokens, [B, T] fp32, 0 outside the loss mask."""

    logp: torch.Tensor  # log pi_old(a_t | s_t)
    entropy: torch.Tensor  # entropy of pi_old at each position
    kl: torch.Tensor  # per-token KL penalty estimate of pi_old against pi_ref (kind = kl_penalty)
    is_weights: torch.Tensor | None  # importance weights pi_old / pi_behaviour (see `off_policy_weights`), or None
    correction: str  # `off_policy_correction`: 'tis' (weights truncated at the cap), 'decoupled' (0 above it), 'none'

    def mean_kl(self, mask: torch.Tensor) -> float:
        """Sum of the KL penalty estimate over each response, averaged over the batch (a device sync)."""
        return float((self.kl * mask).sum(dim=1).mean())


def old_logp_from_update(config: PPOConfig, reward_kl_coef: float, comm: Comm, shared_critic: bool) -> bool:
    """Whether pi_old can be the update's own forward (detached) instead of a policy pass at experience time.

    Only with one optimizer step (later steps see moved weights). The pass stays when something needs pi_old
    before the update: KL-shaped rewards (`reward_kl_coef > 0`, or the `full` KL from logits), a shared critic
    (its values come from that pass), or several ranks (each would only see its own rows of the update)."""
    return (config.one_optimizer_step and reward_kl_coef == 0 and config.kl_penalty != "full"
            and not comm.distributed and not shared_critic)


IMPORTANCE_WEIGHTS = {"tis": losses.truncated_importance_weights, "decoupled": losses.masked_importance_weights}


def off_policy_weights(config: PPOConfig, old_logp: torch.Tensor, behaviour_logp: torch.Tensor | None,
                       mask: torch.Tensor) -> torch.Tensor | None:
    """The importance weights pi_old / pi_behaviour [B, T], 0 outside `mask`, when the step has the sampler's
    log-probs and `off_policy_correction` is not `none`: truncated to `tis_cap` (`tis`), or 0 where they exceed
    it (`decoupled`); else None."""
    weights = IMPORTANCE_WEIGHTS.get(config.off_policy_correction)
    if behaviour_logp is None or weights is None:
        return None
    return weights(old_logp, behaviour_logp, config.tis_cap) * mask


class PiOld:
    """Supplies pi_old to the update, minibatch by minibatch: `from_pass` (log-probs known before the update)
    or `from_update` (the update's own forward, recorded as it runs; one optimizer step, one rank)."""

    def __init__(self, config: PPOConfig, mask: torch.Tensor, ref_logp: torch.Tensor,
                 behaviour_logp: torch.Tensor | None, known: OldPolicy | None) -> None:
        self._config, self._mask, self._ref_logp, self._behaviour = config, mask, ref_logp, behaviour_logp
        self._known = known
        if known is None:  # filled by the update's forward, row by row
            self._logp = torch.zeros_like(mask)
            self._entropy = torch.zeros_like(mask)

    @classmethod
    def from_pass(cls, config: PPOConfig, mask: torch.Tensor, ref_logp: torch.Tensor,
                  behaviour_logp: torch.Tensor | None, logp: torch.Tensor, entropy: torch.Tensor,
                  kl: torch.Tensor) -> "PiOld":
        """pi_old of the experience's policy pass ([B, T] each; `mask` [B, T]: the tokens trained)."""
        return cls(config, mask, ref_logp, behaviour_logp,
                   OldPolicy(logp, entropy, kl, off_policy_weights(config, logp, behaviour_logp, mask),
                             config.off_policy_correction))

    @classmethod
    def from_update(cls, config: PPOConfig, comm: Comm, mask: torch.Tensor, ref_logp: torch.Tensor,
                    behaviour_logp: torch.Tensor | None) -> "PiOld":
        """pi_old = the update's own forward, detached (see the module docstring)."""
        if not config.one_optimizer_step or comm.distributed:
            raise ValueError("pi_old from the update needs one optimizer step on one rank, got "
                             f"ppo_epochs={config.ppo_epochs}, backward_batch_size={config.backward_batch_size}, "
                             f"batch_size={config.batch_size}, world_size={comm.world_size}")
        return cls(config, mask, ref_logp, behaviour_logp, None)

    @property
    def needs_entropy(self) -> bool:
        """The update's forward must give entropies (they are pi_old's)."""
        return self._known is None

    def minibatch(self, rows: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor,
                  entropy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(old log-probs, importance weights or None) [b, w] of the update's minibatch `rows`, whose forward
        gave `logp` (and `entropy`) [b, w] over the tokens `mask` [b, w]."""
        width = logp.shape[1]
        if self._known is not None:
            is_weights = self._known.is_weights
            return self._known.logp[rows, :width], (is_weights[rows, :width] if is_weights is not None else None)
        old_logp = logp.detach()
        self._logp[rows, :width] = old_logp
        self._entropy[rows, :width] = entropy.detach()
        behaviour = self._behaviour[rows, :width] if self._behaviour is not None else None
        return old_logp, off_policy_weights(self._config, old_logp, behaviour, mask)

    def result(self) -> OldPolicy:
        """pi_old on every token of the step (after the update when it came from the update's forward)."""
        if self._known is not None:
            return self._known
        cfg, mask = self._config, self._mask
        kl = kl_penalty(cfg.kl_penalty, self._logp, self._ref_logp, mask, None, None, cfg.temperature)
        return OldPolicy(self._logp, self._entropy, kl, off_policy_weights(cfg, self._logp, self._behaviour, mask),
                         cfg.off_policy_correction)
