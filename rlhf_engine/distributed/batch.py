"""One PPO step's `SampleBatch`, broadcast from rank 0 to every rank as plain tensors (never pickled objects).

Layout on the wire (all broadcasts from rank 0, in this order):
    header    int64 [7]  = n, total prompt tokens, total response tokens, has scores, has behaviour log-probs,
                         has versions, has columns
    lengths   int64 [2n] = prompt lengths, then response lengths
    tokens    int64 [P + R] = all prompts, then all responses, concatenated
    scores    fp32  [n]  (when present; absent: the trainer scores the samples itself)
    behaviour fp32  [R]  (when present) `behaviour_logp`, the sampler's log-prob of each response token
    versions  int64 [R]  (when present) `policy_versions`, the policy version of each response token
    loss_mask uint8 [R]  the tokens trained (1) and the environment's (0)
    columns   a JSON text (`Comm.broadcast_str`; when present) `{field: n values}`: the prompt records' fields
              for a reward function that takes them (`rlhf_engine.data.columns`); JSON values only
"""

from __future__ import annotations

import json
from typing import Any

import torch

from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed.comm import Comm


def broadcast_samples(comm: Comm, batch: SampleBatch | None) -> SampleBatch:
    """Rank 0 passes its batch, the other ranks None; every rank returns an equal `SampleBatch` (CPU tensors)."""
    if not comm.distributed:
        if batch is None:
            raise ValueError("a single rank must pass its batch")
        return batch
    if comm.is_main != (batch is not None):
        raise ValueError(f"rank {comm.rank}: only rank 0 passes a batch, the others pass None")
    header = torch.zeros(7, dtype=torch.int64)
    if comm.is_main:
        p_lens = [len(p) for p in batch.prompt_ids]
        r_lens = [len(r) for r in batch.response_ids]
        header = torch.tensor([len(p_lens), sum(p_lens), sum(r_lens), batch.scores is not None,
                               batch.behaviour_logp is not None, batch.policy_versions is not None,
                               batch.columns is not None], dtype=torch.int64)
    n, p_total, r_total, has_scores, has_behaviour, has_versions, has_columns = comm.broadcast_(header).tolist()

    def send(make_main, shape, dtype) -> torch.Tensor:
        buf = make_main() if comm.is_main else torch.empty(shape, dtype=dtype)
        return comm.broadcast_(buf.contiguous())

    lengths = send(lambda: torch.tensor(p_lens + r_lens, dtype=torch.int64), (2 * n,), torch.int64)
    r_lengths = lengths[n:].tolist()
    tokens = send(lambda: torch.cat(batch.prompt_ids + batch.response_ids), (p_total + r_total,), torch.int64)
    scores = send(lambda: batch.scores.float(), (n,), torch.float32) if has_scores else None
    behaviour = None
    if has_behaviour:
        behaviour = list(send(lambda: torch.cat(batch.behaviour_logp), (r_total,), torch.float32).split(r_lengths))
    versions = None
    if has_versions:
        versions = list(send(lambda: torch.cat(batch.policy_versions), (r_total,), torch.int64).split(r_lengths))
    mask = send(lambda: torch.cat(batch.loss_mask).to(torch.uint8), (r_total,), torch.uint8)  # gloo has no bool
    columns = json.loads(comm.broadcast_str(_columns_json(batch.columns) if comm.is_main else None)) \
        if has_columns else None
    pieces = tokens.split(lengths.tolist())
    return SampleBatch(
        prompt_ids=list(pieces[:n]),
        response_ids=list(pieces[n:]),
        behaviour_logp=behaviour,
        policy_versions=versions,
        loss_mask=list(mask.bool().split(r_lengths)),
        scores=scores,
        columns=columns,
    )


def _columns_json(columns: dict[str, list[Any]]) -> str:
    try:
        return json.dumps(columns)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the prompt records' fields reach the other trainer ranks as JSON, and these are not "
                         f"JSON values: {e}") from e
