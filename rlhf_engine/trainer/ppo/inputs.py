"""The inputs of a PPO step, checked where they enter: token sequences, scores, the sampler's
log-probs and policy versions, each turned into one tensor layout or refused with a message that
names the offending sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

TokenSeqs = Sequence[torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor
"""B token sequences: a list of 1-D tensors or int lists, or a 2-D tensor [B, L]."""


@dataclass
class StepInputs:
    """The checked inputs of one `PPOTrainer.step` (B samples)."""

    queries: list[torch.Tensor]  # B x [Lq_i] int64, CPU
    responses: list[torch.Tensor]  # B x [T_i] int64, CPU (not yet cut after EOS)
    behaviour_logp: torch.Tensor | None  # [B, max T_i] fp32, CPU, 0 on padding; None: on-policy data
    policy_versions: torch.Tensor | None  # [B] int64: the version that sampled each response


def check_step_inputs(queries: TokenSeqs, responses: TokenSeqs, batch_size: int, group_size: int | None,
                      behaviour_logprobs: Any, policy_versions: Any, current_version: int) -> StepInputs:
    """Check and convert `PPOTrainer.step`'s inputs; `group_size`: the prompts must come in groups of
    this many equal ones (grpo / rloo), None: no grouping."""
    queries = as_token_list(queries, "queries")
    responses = as_token_list(responses, "responses")
    n = len(queries)
    if len(responses) != n:
        raise ValueError(f"got {n} queries but {len(responses)} responses")
    if n != batch_size:
        raise ValueError(f"step got {n} samples; config.batch_size is {batch_size}")
    if group_size is not None:
        check_groups(queries, group_size)
    return StepInputs(
        queries=queries,
        responses=responses,
        behaviour_logp=None if behaviour_logprobs is None else as_behaviour_logprobs(behaviour_logprobs, responses),
        policy_versions=None if policy_versions is None else as_policy_versions(policy_versions, n, current_version),
    )


def collate_queries(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dataloader collate: a list of dict samples -> a dict of lists, `input_ids` as 1-D int64 tensors."""
    keys = samples[0].keys()
    return {
        key: [torch.as_tensor(s[key], dtype=torch.long) if key == "input_ids" else s[key] for s in samples]
        for key in keys
    }


def as_token_list(seqs: TokenSeqs, name: str) -> list[torch.Tensor]:
    """B token sequences (a list of 1-D tensors / int lists, or a 2-D tensor) -> list of 1-D int64 CPU tensors;
    empty, non-integer or non-1-D entries raise ValueError naming `name[i]`."""
    if isinstance(seqs, torch.Tensor):
        if seqs.ndim != 2:
            raise ValueError(f"{name} as a tensor must be 2-D [B, L], got shape {tuple(seqs.shape)}")
        seqs = list(seqs)
    out = []
    for i, s in enumerate(seqs):
        t = torch.as_tensor(s)
        if t.ndim != 1:
            raise ValueError(f"{name}[{i}] must be a 1-D token sequence, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name}[{i}] must hold integer token ids, got {t.dtype}")
        out.append(t.long().cpu())
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def as_scores(scores, n: int) -> torch.Tensor:
    """B scores (floats, 0-dim tensors or a tensor) -> [B] fp32; a wrong count raises ValueError."""
    if isinstance(scores, torch.Tensor):
        t = scores.detach().float().reshape(-1)
    else:
        t = torch.stack([torch.as_tensor(s, dtype=torch.float32).detach().cpu().reshape(()) for s in scores])
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} scores for {n} samples")
    return t


def as_behaviour_logprobs(logprobs, responses: list[torch.Tensor]) -> torch.Tensor:
    """The sampler's log-probs as [B, T] fp32 (T = longest response), 0 on padding; checked."""
    n, width = len(responses), max(len(r) for r in responses)
    if isinstance(logprobs, torch.Tensor) and logprobs.ndim == 2:
        if logprobs.shape[0] != n or logprobs.shape[1] < width:
            raise ValueError(
                f"behaviour_logprobs of shape {tuple(logprobs.shape)} must be [{n}, >= {width}] "
                "(batch, response width)"
            )
        rows = [logprobs[i, : len(r)] for i, r in enumerate(responses)]
    else:
        rows = [torch.as_tensor(lp, dtype=torch.float32) for lp in logprobs]
        if len(rows) != n:
            raise ValueError(f"got {len(rows)} behaviour_logprobs for {n} samples")
    out = torch.zeros((n, width), dtype=torch.float32)
    for i, (lp, r) in enumerate(zip(rows, responses)):
        if lp.shape != (len(r),):
            raise ValueError(
                f"behaviour_logprobs[{i}] has shape {tuple(lp.shape)}; response {i} has {len(r)} tokens"
            )
        if not bool(torch.isfinite(lp).all()):
            raise ValueError(f"behaviour_logprobs[{i}] holds non-finite values")
        out[i, : len(r)] = lp.float().cpu()
    return out


def as_policy_versions(versions, n: int, current: int) -> torch.Tensor:
    """B policy versions -> [B] int64, each in [0, current]."""
    t = torch.as_tensor(versions, dtype=torch.long).reshape(-1).cpu()
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} policy_versions for {n} samples")
    if bool((t > current).any()) or bool((t < 0).any()):
        raise ValueError(f"policy_versions must lie in [0, {current}] (the trainer's version); got {t.tolist()}")
    return t


def check_groups(queries: list[torch.Tensor], k: int) -> None:
    """Raise unless the queries form groups of k consecutive equal prompts (grpo / rloo)."""
    for g in range(0, len(queries), k):
        for i in range(g + 1, g + k):
            if not torch.equal(queries[i], queries[g]):
                raise ValueError(
                    f"queries[{i}] differs from queries[{g}]: group estimators need groups of num_generations "
                    f"({k}) consecutive samples with the same prompt"
                )
