"""One PPO step's samples, broadcast from rank 0 to every rank as plain tensors (never pickled objects).

Layout on the wire (all broadcasts from rank 0, in this order):
    header    int64 [7]  = n, total query tokens, total response tokens, has scores, has behaviour log-probs,
                         has versions, has columns
    lengths   int64 [2n] = query lengths, then response lengths
    tokens    int64 [Q + R] = all queries, then all responses, concatenated
    scores    fp32  [n]  (when present; absent: the trainer scores the samples itself)
    behaviour fp32  [R]  (when present) the sampler's log-prob of each response token
    versions  int64 [n]  (when present) the policy version that sampled each response
    columns   a JSON text (`Comm.broadcast_str`; when present) `{field: n values}`: the prompt records' fields
              for a reward function that takes them (`rlhf_engine.data.columns`); JSON values only
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_engine.distributed.comm import Comm


@dataclass
class StepBatch:
    """The inputs of `PPOTrainer.step`: n (query, response) pairs and what came with them."""

    queries: list[torch.Tensor]  # n x [Lq_i] int64
    responses: list[torch.Tensor]  # n x [Lr_i] int64
    scores: torch.Tensor | None = None  # [n] fp32, None: scored by the trainer
    behaviour_logprobs: list[torch.Tensor] | None = None  # n x [Lr_i] fp32
    policy_versions: torch.Tensor | None = None  # [n] int64
    columns: dict[str, list[Any]] | None = None  # {field: n JSON values}, for the reward function

    def __post_init__(self) -> None:
        n = len(self.queries)
        if len(self.responses) != n:
            raise ValueError(f"StepBatch has {n} queries but {len(self.responses)} responses")
        if self.scores is not None and self.scores.shape != (n,):
            raise ValueError(f"StepBatch scores have shape {tuple(self.scores.shape)}, expected ({n},)")
        if self.behaviour_logprobs is not None and len(self.behaviour_logprobs) != n:
            raise ValueError(f"StepBatch has {len(self.behaviour_logprobs)} behaviour_logprobs for {n} samples")
        if self.policy_versions is not None and self.policy_versions.shape != (n,):
            raise ValueError(
                f"StepBatch policy_versions have shape {tuple(self.policy_versions.shape)}, expected ({n},)"
            )
        for name, values in (self.columns or {}).items():
            if len(values) != n:
                raise ValueError(f"StepBatch column {name!r} has {len(values)} values for {n} samples")


def broadcast_step_batch(comm: Comm, batch: StepBatch | None) -> StepBatch:
    """Rank 0 passes its batch, the other ranks None; every rank returns an equal `StepBatch` (CPU tensors)."""
    if not comm.distributed:
        if batch is None:
            raise ValueError("a single rank must pass its batch")
        return batch
    if comm.is_main != (batch is not None):
        raise ValueError(f"rank {comm.rank}: only rank 0 passes a batch, the others pass None")
    header = torch.zeros(7, dtype=torch.int64)
    if comm.is_main:
        q_lens = [len(q) for q in batch.queries]
        r_lens = [len(r) for r in batch.responses]
        header = torch.tensor([len(q_lens), sum(q_lens), sum(r_lens), batch.scores is not None,
                               batch.behaviour_logprobs is not None,
                               batch.policy_versions is not None, batch.columns is not None], dtype=torch.int64)
    n, q_total, r_total, has_scores, has_behaviour, has_versions, has_columns = comm.broadcast_(header).tolist()

    def send(make_main, shape, dtype) -> torch.Tensor:
        buf = make_main() if comm.is_main else torch.empty(shape, dtype=dtype)
        return comm.broadcast_(buf.contiguous())

    lengths = send(lambda: torch.tensor(q_lens + r_lens, dtype=torch.int64), (2 * n,), torch.int64)
    tokens = send(lambda: torch.cat([t.long() for t in batch.queries + batch.responses]), (q_total + r_total,),
                  torch.int64)
    scores = send(lambda: batch.scores.float(), (n,), torch.float32) if has_scores else None
    behaviour = None
    if has_behaviour:
        flat = send(lambda: torch.cat([torch.as_tensor(b, dtype=torch.float32) for b in batch.behaviour_logprobs]),
                    (r_total,), torch.float32)
        behaviour = list(flat.split(lengths[n:].tolist()))
    versions = send(lambda: batch.policy_versions.long(), (n,), torch.int64) if has_versions else None
    columns = json.loads(comm.broadcast_str(_columns_json(batch.columns) if comm.is_main else None)) \
        if has_columns else None
    pieces = tokens.split(lengths.tolist())
    return StepBatch(
        queries=list(pieces[:n]),
        responses=list(pieces[n:]),
        scores=scores,
        behaviour_logprobs=behaviour,
        policy_versions=versions,
        columns=columns,
    )


def _columns_json(columns: dict[str, list[Any]]) -> str:
    try:
        return json.dumps(columns)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the prompt records' fields reach the other trainer ranks as JSON, and these are not "
                         f"JSON values: {e}") from e
