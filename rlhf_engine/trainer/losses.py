"""PPO loss pieces as pure functions of per-token tensors [B, T] (B sequences, T response tokens).

Every reduction is a masked mean over the valid response tokens (`mask` is 1 on tokens up to and including
EOS, 0 on padding), the token-level aggregation of TRL's PPO. By default the mean is over the slice's own
tokens; with `token_count` N it is sum / N, so that the slices of one optimizer step (micro-batches, ranks)
each contribute their share of one mean over the whole minibatch and sum to it exactly.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.ops import masked_mean


def token_mean(x: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum(x * mask) / token_count over valid tokens (masked positions ignored even when non-finite);
    token_count None: the mask's own count (`masked_mean`)."""
    if token_count is None:
        return masked_mean(x, mask)
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / token_count


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    is_weights: torch.Tensor | None = None,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss of PPO (Schulman et al. 2017).

    logp [B, T]: current policy log-probs (with grad); old_logp [B, T]: at experience time;
    advantages [B, T]; mask [B, T]; is_weights [B, T] or None: per-token importance weights
    pi_old / pi_behaviour for off-policy samples, detached (`truncated_importance_weights`, or
    `masked_importance_weights`: a weight 0 drops the token's gradient, yet the token stays in the mean's
    denominator, as in AReaL); token_count: see the module docstring.
    Returns (scalar loss, stats), 0-dim and detached: `clipfrac`; `approxkl`, the k2 estimator
    0.5 * E[(log pi - log pi_old)^2] of KL(pi_old || pi) (TRL's, and what `target_kl` compares with);
    `approxkl_k3`, the unbiased k3 estimator E[(ratio - 1) - log ratio] (Schulman, "Approximating KL
    divergence"; CleanRL's `approx_kl`); `ratio`, the mean ratio.
    """
    # ratio_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    # L_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = token_mean(per_token, mask, token_count)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((clipped > unclipped).float(), mask, token_count),
            # k2 = 0.5 * E[(log pi - log pi_old)^2], the estimator TRL reports
            "approxkl": 0.5 * token_mean(log_ratio**2, mask, token_count),
            # k3 = E[(ratio - 1) - log ratio] >= 0 per token, unbiased for KL(pi_old || pi) on pi_old's samples
            "approxkl_k3": token_mean((ratio - 1.0) - log_ratio, mask, token_count),
            "ratio": token_mean(ratio, mask, token_count),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss.

    values [B, T]: current predictions (with grad); old_values [B, T]: at experience time; returns [B, T].
    # V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    # L = 0.5 * E[max((V - R)^2, (V_clip - R)^2)]
    Returns (scalar loss, stats) with `clipfrac` (share of tokens where the clipped term is larger) and
    `error` (mean squared error of the unclipped prediction).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(loss_unclipped, loss_clipped), mask, token_count)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((loss_clipped > loss_unclipped).float(), mask, token_count),
            "error": token_mean(loss_unclipped, mask, token_count),
        }
    return loss, stats


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean token entropy [B, T] -> scalar; the loss subtracts entropy_coef times this."""
    return token_mean(entropy, mask, token_count)


def truncated_importance_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling weights between the trainer's and the sampler's policy.

    old_logp, behaviour_logp [B, T] -> w [B, T], detached:
    # w_t = min(pi_old(a_t|s_t) / pi_behaviour(a_t|s_t), C)
    Corrects samples drawn by an older policy version (async generation) or by a sampler whose numerics
    differ from the trainer's (vLLM vs transformers). Padding positions should be masked by the caller.
    """
    return torch.exp(old_logp - behaviour_logp).clamp(max=cap).detach()


def masked_importance_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """Importance weights of the decoupled PPO objective (AReaL, Fu et al. 2025): tokens far off-policy dropped.

    old_logp, behaviour_logp [B, T] -> w [B, T], detached:
    # w_t = pi_old(a_t|s_t) / pi_behaviour(a_t|s_t)   if that is <= C
    # w_t = 0                                           otherwise (the token adds no gradient)
    pi_old is the proximal policy the PPO ratio is clipped against, pi_behaviour the sampler. A kept token's
    weight is its exact ratio (no truncation bias); a dropped token loses its signal. The test is
    log w_t > log C, the one the step's `off_policy/is_masked_fraction` counts. Padding positions should be
    masked by the caller.
    """
    log_w = (old_logp - behaviour_logp).detach()
    dropped = log_w > math.log(cap)
    return torch.where(dropped, torch.zeros((), dtype=log_w.dtype, device=log_w.device), torch.exp(log_w))
