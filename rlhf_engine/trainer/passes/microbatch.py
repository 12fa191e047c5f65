"""Micro-batch planning: which samples go through one forward (and backward) pass together.

`plan_microbatches` is a pure function of the samples' token counts and the configuration; the trainer
calls it through `rank_microbatches` for the experience passes (each rank's share in order) and for each
optimizer step (each rank's share of its shuffled samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_engine.distributed.comm import Comm


def plan_microbatches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Cut positions 0..n-1 of `lengths` (the samples' real token counts, in pass order) into consecutive
    micro-batches.

    max_tokens 0: `max_rows` samples each (the last may hold fewer). max_tokens > 0: greedily, as many
    consecutive samples as fit in `max_tokens` tokens (`max_rows` is ignored): a micro-batch is closed when
    the next sample would overflow it. The budget counts real tokens, which is what a packed pass
    processes; padded passes also process padding.
    A sample longer than `max_tokens` raises ValueError naming its position, length and the budget.
    """
    n = len(lengths)
    if max_tokens == 0:
        return [list(range(start, min(start + max_rows, n))) for start in range(0, n, max_rows)]
    plan: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(f"sample {i} has {length} tokens (query + response); "
                             f"max_tokens_per_microbatch is {max_tokens}")
        if current and used + length > max_tokens:
            plan.append(current)
            current, used = [], 0
        current.append(i)
        used += length
    if current:
        plan.append(current)
    return plan


def split_to_count(plan: list[list[int]], count: int) -> list[list[int]]:
    """`plan` with its largest micro-batches halved until it holds `count` of them (same order of samples)."""
    plan = [list(mb) for mb in plan]
    while len(plan) < count:
        largest = max(range(len(plan)), key=lambda i: len(plan[i]))
        mb = plan[largest]
        if len(mb) < 2:
            raise ValueError(f"cannot cut {sum(len(m) for m in plan)} samples into {count} micro-batches")
        plan[largest : largest + 1] = [mb[: len(mb) // 2], mb[len(mb) // 2 :]]
    return plan


def rank_microbatches(rows: Sequence[int], lengths: Sequence[int], max_tokens: int, max_rows: int,
                      comm: Comm) -> list[list[int]]:
    """This rank's micro-batches of `rows` (its share of a batch, as batch row ids; `lengths` indexed by row
    id): `plan_microbatches`, then, on several ranks, `split_to_count` to the largest count of any rank,
    because sharded (FSDP) models run collectives in every forward and all ranks must make as many passes.
    One all-reduce when distributed."""
    plan = plan_microbatches([lengths[r] for r in rows], max_tokens, max_rows)
    if comm.distributed:
        counts = torch.zeros(comm.world_size)
        counts[comm.rank] = len(plan)
        plan = split_to_count(plan, int(comm.all_reduce_sum(counts).max()))
    return [[rows[i] for i in mb] for mb in plan]
