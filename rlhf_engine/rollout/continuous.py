"""`ContinuousLoop`: continuous generation (`generator.max_inflight` > 0), the generator's loop past one batch
at a time.

    take a weight update when one is complete (what happens to running sequences: `generator.inflight_update`)
    ->  start prompts while fewer than `max_inflight` sequences run (taking batches the trainer handed out
        ahead, each once weights new enough for it are held)
    ->  one `Generator.step` (vLLM: one decode step of every running sequence)
    ->  push each prompt's samples as soon as its whole group finished

A long sequence holds up nothing but its own group: the others finish, are sent, and new prompts take their
places. The staleness rule of `GeneratorLoop` holds per prompt (no prompt starts with weights older than its
batch allows). Once the weights are `max_staleness` versions past a batch's `min_policy_version`, the trainer
needs that batch's groups for its next step: while such a *due* batch has sequences running, no prompt of a
later batch starts, so each decode step runs fewer sequences and the ones the trainer waits for finish sooner.
`inflight_update`:

- `off`: once an update is complete no prompt starts; the running sequences finish on the old weights, then it
  is applied (no sample mixes versions).
- `keep`: applied between two steps; running sequences continue on their KV cache (their later tokens carry the
  new version: per-token `policy_versions`).
- `recompute`: applied between two steps, then every running sequence is re-prefilled under it
  (`Generator.recompute`).

Seeds follow the batch, as in `GeneratorLoop`: sample j of prompt i of batch b draws with
`batch_seed(b) + i * n + j`, so with nothing updated mid-sequence the samples are those of one `generate` call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import SamplingConfig
from rlhf_engine.rollout.generator import Generator
from rlhf_engine.rollout.loop import GeneratorLoop, LoopStats
from rlhf_engine.transport import PromptBatch, WeightUpdate

log = logging.getLogger(__name__)


@dataclass
class _OpenBatch:
    """A prompt batch taken from the trainer whose groups are not all sent yet."""

    batch: PromptBatch
    serial: int
    """Its number among the batches this loop took (keeps rollout ids unique across re-issues)."""
    sampling: SamplingConfig
    started: int = 0
    """Prompts submitted so far (in order)."""
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    """Finished samples by prompt position."""
    sent: int = 0
    """Prompts whose group was pushed."""


class ContinuousLoop(GeneratorLoop):
    """Serve prompt batches from `port` continuously (see the module docstring)."""

    def __init__(self, generator: Generator, port, *, max_staleness: int = 1, poll_s: float = 0.2,
                 max_prompt_tokens: int | None = None) -> None:
        super().__init__(generator, port, max_staleness=max_staleness, poll_s=poll_s,
                         max_prompt_tokens=max_prompt_tokens)
        config = generator.config
        if config.max_inflight < 1:
            raise ValueError(f"continuous generation needs max_inflight >= 1, got {config.max_inflight}")
        if config.inflight_update == "recompute" and not generator.can_recompute:
            raise ValueError(f"inflight_update recompute: {type(generator).__name__} cannot re-prefill running "
                             "sequences")
        self.max_inflight = config.max_inflight
        self.inflight_update = config.inflight_update
        self._open: deque[_OpenBatch] = deque()
        self._taken = 0
        self._update: WeightUpdate | None = None
        """A complete update not yet applied (`off`: waiting for the running sequences to finish)."""

    def run(self, max_batches: int | None = None) -> LoopStats:
        """Serve until the transport raises (shutdown, dead trainer) or `max_batches` batches were sent whole."""
        while max_batches is None or self.stats.batches < max_batches:
            self._take_update()
            self._start_prompts()
            if self.generator.running:
                t0 = time.perf_counter()
                finished = self.generator.step()
                self.stats.generate_s += time.perf_counter() - t0
                self._finish(finished)
            elif not self._open or self._update is not None:
                t0 = time.perf_counter()  # nothing to run: wait for a batch (raises ShutdownRequested / PeerDeadError)
                batch = self.port.recv_prompts(timeout_s=self.poll_s)
                self.stats.idle_s += time.perf_counter() - t0
                if batch is not None:
                    self._take(batch)
        return self.stats

    def _take_update(self) -> None:
        """Apply the newest complete update as `inflight_update` says."""
        if self._update is None:
            self._update = self.port.poll_weights()
        if self._update is None or (self.inflight_update == "off" and self.generator.running):
            return
        update, self._update = self._update, None
        running, before = self.generator.running, self.generator.version
        self.apply(update)
        if running and self.generator.version != before:
            self.stats.inflight_updates += 1
            if self.inflight_update == "recompute":
                t0 = time.perf_counter()
                self.stats.recomputed_sequences += self.generator.recompute()
                self.stats.update_s += time.perf_counter() - t0

    def _take(self, batch: PromptBatch) -> None:
        self._open.append(_OpenBatch(batch, self._taken, self.sampling(batch)))
        self._taken += 1

    def _due(self, b: _OpenBatch) -> bool:
        """Whether the trainer holds weights past `b`'s staleness bound: it needs `b`'s groups for its next step
        (it waits for them now)."""
        return not b.batch.is_eval and b.batch.min_policy_version + self.max_staleness <= self.generator.version

    def _start_prompts(self) -> None:
        """Submit prompts while there is room for their groups (not while an `off` update waits). While a due
        batch still has sequences running, only due prompts start: fewer sequences per decode step finish the
        ones the trainer waits for sooner."""
        while self._update is None:
            head = next((b for b in self._open if b.started < len(b.batch.prompts)), None)
            if head is not None and not self._due(head) and any(
                    b.sent < b.started and self._due(b) for b in self._open):
                return
            if head is None:
                if self.max_inflight - self.generator.running < self.generator.config.sampling.n:
                    return
                batch = self.port.recv_prompts(timeout_s=0.0)
                if batch is None:
                    return
                self._take(batch)
                continue
            if self.generator.version < self.required_version(head.batch):
                if self.generator.running:
                    return  # the running sequences go on; the batch starts once its weights arrive
                self.await_weights(head.batch)
            n = head.sampling.n
            count = min((self.max_inflight - self.generator.running) // n, len(head.batch.prompts) - head.started)
            if count < 1:
                if self.generator.running:
                    return
                count = 1  # an evaluation group larger than max_inflight runs alone
            start, end = head.started, head.started + count
            budgets = self.budgets(head.batch.max_new_tokens)
            self.generator.submit((head, start), head.batch.prompts[start:end], sampling=head.sampling,
                                  seed=self.generator.config.batch_seed(head.batch.batch_id) + start * n,
                                  max_new_tokens=budgets[start:end] if budgets is not None else None)
            head.started = end

    def _finish(self, finished: list[tuple[tuple[_OpenBatch, int], Sample]]) -> None:
        """File finished samples under their prompt; push each group once whole."""
        for (open_batch, offset), sample in finished:
            i = offset + sample.prompt_id
            group = open_batch.samples.setdefault(i, [])
            group.append(dataclasses.replace(sample, prompt_id=i, sample_id=f"{i}/{sample.sample_id.split('/')[1]}"))
            if len(group) == open_batch.sampling.n:
                self.send(open_batch.batch, sorted(group, key=lambda s: s.sample_id), open_batch.serial)
                del open_batch.samples[i]
                open_batch.sent += 1
                if open_batch.sent == len(open_batch.batch.prompts):
                    self._open.remove(open_batch)
                    self.stats.batches += 1
