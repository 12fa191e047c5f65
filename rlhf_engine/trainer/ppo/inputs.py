"""The inputs of a PPO step, checked where they enter: `PPOTrainer.step`'s TRL-style arguments (token
sequences, scores, the sampler's log-probs and policy versions) turned into one `SampleBatch`, and a
`SampleBatch` checked against the trainer's config, each refused with a message that names the
offending sample."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_engine.data.samples import SampleBatch

TokenSeqs = Sequence[torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor
"""B token sequences: a list of 1-D tensors or int lists, or a 2-D tensor [B, L]."""


def samples_from_step_args(queries: TokenSeqs, responses: TokenSeqs, behaviour_logprobs: Any, policy_versions: Any,
                           columns: dict[str, Sequence[Any]] | None) -> SampleBatch:
    """`PPOTrainer.step`'s arguments as a `SampleBatch` (every token trained; one version per response
    becomes every token's)."""
    prompt_ids = as_token_list(queries, "queries")
    response_ids = as_token_list(responses, "responses")
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise ValueError(f"got {n} queries but {len(response_ids)} responses")
    versions = None
    if policy_versions is not None:
        per_sample = as_policy_versions(policy_versions, n)
        versions = [torch.full((len(r),), int(v), dtype=torch.int64) for v, r in zip(per_sample, response_ids)]
    return SampleBatch(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        behaviour_logp=None if behaviour_logprobs is None else as_behaviour_logprobs(behaviour_logprobs, response_ids),
        policy_versions=versions,
        columns=None if columns is None else {name: list(values) for name, values in columns.items()},
    )


def check_batch(batch: SampleBatch, batch_size: int, group_size: int | None, current_version: int) -> None:
    """Raise unless `batch` fits a step: `batch_size` samples, prompts in groups of `group_size` equal ones
    (grpo / rloo; None: no grouping), finite behaviour log-probs, versions no newer than the trainer's."""
    n = len(batch)
    if n != batch_size:
        raise ValueError(f"step got {n} samples; config.batch_size is {batch_size}")
    for i, r in enumerate(batch.response_ids):
        if r.numel() == 0:
            raise ValueError(f"response_ids[{i}] is empty")
    if group_size is not None:
        check_groups(batch.prompt_ids, group_size)
    for i, lp in enumerate(batch.behaviour_logp or []):
        if not bool(torch.isfinite(lp).all()):
            raise ValueError(f"behaviour_logprobs[{i}] holds non-finite values")
    if batch.policy_versions is not None:
        newest = max(int(v.max()) for v in batch.policy_versions if v.numel())
        if newest > current_version:
            raise ValueError(f"policy_versions must lie in [0, {current_version}] (the trainer's version); got "
                             f"{batch.oldest_versions().tolist()} (oldest per sample), newest {newest}")


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


def as_behaviour_logprobs(logprobs, responses: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sampler's log-probs (B sequences as long as the responses, or [B, >= T]) as B x [T_i] fp32 CPU
    tensors; checked."""
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
    out = []
    for i, (lp, r) in enumerate(zip(rows, responses)):
        if lp.shape != (len(r),):
            raise ValueError(
                f"behaviour_logprobs[{i}] has shape {tuple(lp.shape)}; response {i} has {len(r)} tokens"
            )
        if not bool(torch.isfinite(lp).all()):
            raise ValueError(f"behaviour_logprobs[{i}] holds non-finite values")
        out.append(lp.detach().float().cpu())
    return out


def as_policy_versions(versions, n: int) -> torch.Tensor:
    """B policy versions -> [B] int64, each >= 0 (`check_batch` bounds them by the trainer's version)."""
    t = torch.as_tensor(versions, dtype=torch.long).reshape(-1).cpu()
    if t.shape[0] != n:
        raise ValueError(f"got {t.shape[0]} policy_versions for {n} samples")
    if bool((t < 0).any()):
        raise ValueError(f"policy_versions must be >= 0; got {t.tolist()}")
    return t


def check_groups(prompt_ids: list[torch.Tensor], k: int) -> None:
    """Raise unless the prompts form groups of k consecutive equal ones (grpo / rloo)."""
    for g in range(0, len(prompt_ids), k):
        for i in range(g + 1, g + k):
            if not torch.equal(prompt_ids[i], prompt_ids[g]):
                raise ValueError(
                    f"queries[{i}] differs from queries[{g}]: group estimators need groups of num_generations "
                    f"({k}) consecutive samples with the same prompt"
                )
