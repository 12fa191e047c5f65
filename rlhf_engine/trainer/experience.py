"""Experience of a PPO step: the padded token batch and the no-grad forward passes that score it.

Layout of a batch of B (query, response) pairs, one row each:

    input_ids [B, Lq + T] = [ left-padded query | right-padded response ]

so every query ends at column Lq - 1 and every response starts at column Lq. The logits at columns
Lq - 1 ... Lq + T - 2 predict the T response tokens; the model only computes the last T + 1 positions
(`logits_to_keep`). Per-token tensors of the experience are [B, T] over response tokens, with
`response_mask` 1 up to and including the first EOS and 0 after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.ops import logprobs_from_logits

IGNORE_INDEX = -100

TokenSeqs = Sequence[torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class TokenBatch:
    """Queries and responses side by side (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [B, Lq + T] int64, padding = pad_token_id
    attention_mask: torch.Tensor  # [B, Lq + T] int64
    position_ids: torch.Tensor  # [B, Lq + T] int64, 0 at each query's first token
    response_ids: torch.Tensor  # [B, T] int64
    response_mask: torch.Tensor  # [B, T] float32
    has_eos: torch.Tensor  # [B] bool
    query_width: int  # Lq

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def labels(self) -> torch.Tensor:
        """Response ids [B, T] with IGNORE_INDEX on padding, for `logprobs_from_logits`."""
        return self.response_ids.masked_fill(self.response_mask == 0, IGNORE_INDEX)

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """The sub-batch of `rows`, with columns that are padding in every selected row trimmed off."""
        attention_mask = self.attention_mask[rows]
        response_mask = self.response_mask[rows]
        # device sync: the trimmed widths are read back as Python ints
        lead = int((attention_mask[:, : self.query_width] == 0).sum(dim=1).min())
        width = int(response_mask.sum(dim=1).max())
        end = self.query_width + width
        return replace(
            self,
            input_ids=self.input_ids[rows, lead:end],
            attention_mask=attention_mask[:, lead:end],
            position_ids=self.position_ids[rows, lead:end],
            response_ids=self.response_ids[rows, :width],
            response_mask=response_mask[:, :width],
            has_eos=self.has_eos[rows],
            query_width=self.query_width - lead,
        )


def truncate_after_eos(response: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """A response [n] cut just after its first EOS token (kept as is when it has none)."""
    if eos_token_id is None:
        return response
    hits = (response == eos_token_id).nonzero()
    return response if hits.numel() == 0 else response[: int(hits[0, 0]) + 1]


def make_token_batch(
    queries: list[torch.Tensor],
    responses: list[torch.Tensor],
    pad_token_id: int,
    eos_token_id: int | None,
    device: torch.device | str = "cpu",
) -> TokenBatch:
    """Pad B queries (left) and B responses (right, each cut after its first EOS) into a `TokenBatch`.

    queries, responses: lists of non-empty 1-D int64 tensors (checked by the caller).
    """
    responses = [truncate_after_eos(r, eos_token_id) for r in responses]
    batch = len(queries)
    q_width = max(len(q) for q in queries)
    r_width = max(len(r) for r in responses)
    input_ids = torch.full((batch, q_width + r_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, q_width + r_width), dtype=torch.long)
    response_mask = torch.zeros((batch, r_width), dtype=torch.float32)
    has_eos = torch.zeros(batch, dtype=torch.bool)
    for i, (q, r) in enumerate(zip(queries, responses)):
        input_ids[i, q_width - len(q) : q_width] = q
        input_ids[i, q_width : q_width + len(r)] = r
        attention_mask[i, q_width - len(q) : q_width + len(r)] = 1
        response_mask[i, : len(r)] = 1.0
        has_eos[i] = eos_token_id is not None and bool(r[-1] == eos_token_id)
    # positions count from each query's first real token; padding gets 0 (it is never attended)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        response_ids=input_ids[:, q_width:].to(device),
        response_mask=response_mask.to(device),
        has_eos=has_eos.to(device),
        query_width=q_width,
    )


@dataclass
class ForwardOut:
    """Per-token outputs of one forward pass over a `TokenBatch` (all [B, T], logits [B, T, V])."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def forward_policy(
    model: nn.Module,
    batch: TokenBatch,
    temperature: float,
    *,
    with_values: bool = False,
    with_entropy: bool = False,
    keep_logits: bool = False,
) -> ForwardOut:
    """One pass of a causal LM (or `AutoModelForCausalLMWithValueHead`) over `batch`.

    Log-probs (and entropies) of the response tokens at `temperature` come from the fused
    `logprobs_from_logits` op, never from a full log_softmax; values come from the value head of the same
    pass (`with_values` needs an `AutoModelForCausalLMWithValueHead`). `keep_logits` also returns the
    response logits [B, T, V] as the model produced them (for the `full` KL).
    """
    keep = batch.response_width + 1
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
    )
    values = None
    if with_values:
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise TypeError(f"values need an AutoModelForCausalLMWithValueHead, got {type(model).__name__}")
        logits, values = model(**kwargs)
        values = values[:, :-1] * batch.response_mask  # [B, T]
    else:
        if isinstance(model, AutoModelForCausalLMWithValueHead):
            model = model.pretrained_model
        logits = model(**kwargs, use_cache=False).logits
    logits = logits[:, :-1]  # [B, T, V]: the logit at column Lq - 1 + t predicts response token t
    labels = batch.labels()
    if with_entropy:
        logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    else:
        logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature), None
    return ForwardOut(logp=logp, entropy=entropy, values=values, logits=logits if keep_logits else None)


def forward_values(critic: AutoModelForCausalLMWithValueHead, batch: TokenBatch) -> torch.Tensor:
    """Values [B, T] of a separate critic at the positions that predict each response token."""
    values = critic.values(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.response_width + 1,
    )
    return values[:, :-1] * batch.response_mask  # [B, T]


@dataclass
class Experience:
    """Everything the PPO epochs need about a batch, computed once without gradients ([B, T] unless noted)."""

    batch: TokenBatch
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor | None  # None for the critic-free estimators
    entropy: torch.Tensor
    kl: torch.Tensor  # per-token KL penalty estimate (kind = kl_penalty)
    scores: torch.Tensor  # [B], after clipping and the missing-EOS penalty
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    is_weights: torch.Tensor | None  # truncated importance weights (off-policy samples) or None


# ------------------------------------------------------------------------------------------------------
# inputs of a step, checked where they enter
# ------------------------------------------------------------------------------------------------------
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
