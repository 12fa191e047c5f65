"""`HandOut`: the training prompts the trainer has handed out, batch by batch, and which of them were trained:
what a checkpoint keeps so that a resumed run trains every drawn prompt exactly once.

Batch b holds the prompts drawn b-th from the `PromptStream`, with wire ids `b * per_batch + j`. Batches
are handed out in order and, streaming (`engine.streaming`), trained out of order: a checkpoint records the
stream's position before the oldest batch with an untrained prompt and the wire ids trained after it. A
resumed run draws from there again (the same prompts, the same ids) and skips those ids, so the prompts that
were in flight (sampled or not) are sampled again under the resumed weights, never trained twice or lost.
"""

from __future__ import annotations

from typing import Any

from rlhf_engine.data.prompts import Prompt, PromptStream


class HandOut:
    """The batches drawn from `stream`, `per_batch` prompts each, and the untrained prompts of each."""

    def __init__(self, stream: PromptStream, per_batch: int) -> None:
        if per_batch < 1:
            raise ValueError(f"per_batch ({per_batch}) must be >= 1")
        self.stream = stream
        self.per_batch = per_batch
        self.next_batch = 0
        """The batch `draw` hands out next."""
        self._untrained: dict[int, set[int]] = {}
        """Of each batch with untrained prompts: their wire ids."""
        self._stream_before: dict[int, dict[str, int]] = {}
        """The stream's state before each batch in `_untrained` was drawn."""
        self._skip: set[int] = set()
        """Wire ids trained before the checkpoint this run resumed from: not handed out again."""

    def draw(self) -> dict[int, Prompt]:
        """The next batch's prompts by wire id (those trained before a resume left out; maybe none)."""
        b = self.next_batch
        self._stream_before[b] = self.stream.state_dict()
        drawn = {b * self.per_batch + j: p for j, p in enumerate(self.stream.next_batch(self.per_batch))}
        prompts = {pid: p for pid, p in drawn.items() if pid not in self._skip}
        self._skip.difference_update(drawn)
        self._untrained[b] = set(prompts)
        self.next_batch += 1
        self._forget_trained()
        return prompts

    def trained(self, wire_ids: list[int]) -> None:
        """Mark the prompts `wire_ids` trained (each handed out and not trained before)."""
        for pid in wire_ids:
            left = self._untrained.get(pid // self.per_batch)
            if left is None or pid not in left:
                raise ValueError(f"prompt {pid} was not in flight (trained twice, or never handed out)")
            left.remove(pid)
        self._forget_trained()

    def _forget_trained(self) -> None:
        for b in [b for b, left in self._untrained.items() if not left]:
            del self._untrained[b], self._stream_before[b]

    def state_dict(self) -> dict[str, Any]:
        """Where a resumed run starts drawing again: the oldest batch with untrained prompts (or the next), the
        stream's state before it, and the prompts trained since (wire ids)."""
        first = min(self._untrained, default=self.next_batch)
        untrained = set().union(*self._untrained.values())
        after = range(first * self.per_batch, self.next_batch * self.per_batch)
        return {"batch": first,
                "prompts": self._stream_before.get(first, self.stream.state_dict()),
                "trained_prompts": sorted({pid for pid in after if pid not in untrained} | self._skip)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Resume from `state` (`state_dict`); a checkpoint of the batch pipeline (no `batch`) resumes at
        batch `step`."""
        self.stream.load_state_dict(state["prompts"])
        self.next_batch = int(state.get("batch", step))
        self._skip = {int(pid) for pid in state.get("trained_prompts", [])}
        self._untrained, self._stream_before = {}, {}
