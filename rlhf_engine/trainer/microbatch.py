"""Micro-batch planning: which samples go through one forward (and backward) pass together.

A pure function of the samples' token counts and the configuration; the trainer calls it for the
experience passes (all samples in order) and for each optimizer step (its shuffled samples).
"""

from __future__ import annotations

from collections.abc import Sequence


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
