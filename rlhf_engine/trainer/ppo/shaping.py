"""Per-token rewards of RLHF: a sequence score at the last response token, a KL penalty at every token."""

from __future__ import annotations

import torch

from rlhf_engine.ops import token_kl


def kl_penalty(
    kind: str,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL estimate between policy and reference, 0 on padding.

    logp, ref_logp, mask [B, T]; kind in kl|abs|mse|k3 uses the log-probs of the sampled tokens;
    kind == "full" uses logits, ref_logits [B, T, V] and gives the exact KL(pi || ref) over the vocabulary
    of the two distributions at `temperature` (fused: no [B, T, V] temporaries). Returns [B, T] fp32.
    """
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl_penalty kind='full' needs logits and ref_logits [B, T, V]")
        return token_kl(logits, ref_logits, kind="full", mask=mask, temperature=temperature)
    return token_kl(logp, ref_logp, kind=kind, mask=mask)


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the token MDP.

    scores [B]; kl, mask [B, T] (mask: the tokens trained, each row non-empty unless its sample is dropped).
    # r_t = -kl_coef * KL_t                  for every valid t
    # r_last += score                         at the last valid token of each row
    Returns (rewards [B, T], non_score_rewards [B, T]) in fp32, 0 on padding.
    """
    mask = mask.to(torch.float32)
    non_score = -kl_coef * kl.to(torch.float32) * mask
    last = last_token_index(mask)  # [B]
    rewards = non_score.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(torch.float32)
    return rewards, non_score


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row of a mask [B, T] -> [B] (int64), -1 for a row without one
    (the mask may have holes: environment tokens between the policy's)."""
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """scores [B] clipped to [-clip, clip] (unchanged when clip is None)."""
    return scores if clip is None else scores.clamp(-clip, clip)


def missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores [B] minus `penalty` where has_eos [B] is False (unchanged when penalty is None)."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos).to(scores.dtype)
