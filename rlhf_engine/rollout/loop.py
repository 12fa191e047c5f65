"""`GeneratorLoop`: the busy loop of a generator process, between a `Generator` and the transport.

    apply the newest complete weight update (if any)  ->  take a prompt batch  ->
    wait for weights new enough for it  ->  play its episodes (`EpisodeRunner`: one `generate` call
    without an environment)  ->  push each `Sample`

Staleness: a batch is never sampled with weights older than `batch.min_policy_version` (the
trainer's version when it handed the batch out), nor older than `max_staleness` versions
behind the newest version any batch has announced; the loop waits for a newer update
otherwise and counts the time as `wait_weights_s`. Transport errors end the loop:
`ShutdownRequested` is an orderly stop, `PeerDeadError` (no heartbeat) an error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass

from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import SamplingConfig
from rlhf_engine.rollout.episodes import EpisodeRunner
from rlhf_engine.rollout.generator import Generator
from rlhf_engine.transport import PromptBatch, WeightUpdate

log = logging.getLogger(__name__)


@dataclass
class LoopStats:
    """What the loop did; logged at exit and returned by `run`."""

    batches: int = 0
    rollouts: int = 0
    generated_tokens: int = 0
    updates_applied: int = 0
    updates_ignored: int = 0
    generate_s: float = 0.0
    """Seconds inside `Generator.generate`."""
    update_s: float = 0.0
    """Seconds applying weight updates."""
    wait_weights_s: float = 0.0
    """Seconds a batch waited for weights new enough to sample it (staleness bound)."""
    idle_s: float = 0.0
    """Seconds waiting for prompts."""
    inflight_updates: int = 0
    """Continuous generation: updates applied while sequences ran (`keep`, `recompute`)."""
    recomputed_sequences: int = 0
    """Continuous generation, `recompute`: running sequences re-prefilled after an update."""


class GeneratorLoop:
    """Serve prompt batches from `port` (a `GeneratorPort`) with `generator` until stopped.

    The loop owns neither: whoever built them closes them (see `process.run_generator`).
    """

    def __init__(self, generator: Generator, port, *, max_staleness: int = 1, poll_s: float = 0.2,
                 max_prompt_tokens: int | None = None) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness ({max_staleness}) must be >= 0")
        self.generator = generator
        room = generator.config.max_model_len - generator.config.sampling.max_new_tokens
        self.episodes = EpisodeRunner(generator, generator.config.environment,
                                      max_prompt_tokens=min(room, max_prompt_tokens or room))
        """Plays each batch as episodes of the generator's environment (one turn each without one)."""
        self.port = port
        self.max_staleness = max_staleness
        self.poll_s = poll_s
        self.stats = LoopStats()
        self._announced = generator.version
        """Newest policy version a batch has announced (its min_policy_version)."""

    def run(self, max_batches: int | None = None) -> LoopStats:
        """Serve batches until the transport raises (shutdown, dead trainer) or `max_batches` are done."""
        while max_batches is None or self.stats.batches < max_batches:
            self.apply(self.port.poll_weights())
            t0 = time.perf_counter()
            batch = self.port.recv_prompts(timeout_s=self.poll_s)  # raises ShutdownRequested / PeerDeadError
            self.stats.idle_s += time.perf_counter() - t0
            if batch is not None:
                self.serve(batch)
        return self.stats

    def apply(self, update: WeightUpdate | None) -> None:
        """Apply `update` if it is newer than the generator's weights; acknowledge it either way."""
        if update is None:
            return
        t0 = time.perf_counter()
        applied = False
        try:
            applied = self.generator.update_weights(update.version, update.tensors)
        finally:
            update.ack(applied)  # releases the trainer's buffer; a failed update is acked as not applied
        self.stats.update_s += time.perf_counter() - t0
        if applied:
            self.stats.updates_applied += 1
            log.info("applied weights v%d in %.3f s", update.version, time.perf_counter() - t0)
        else:
            self.stats.updates_ignored += 1

    def serve(self, batch: PromptBatch) -> None:
        """Generate for one batch (after waiting for new-enough weights) and push its rollouts."""
        self.await_weights(batch)
        t0 = time.perf_counter()
        # the seed follows the batch, not the generator: a run reproduces whichever generator serves it
        samples = self.episodes.run(batch.prompts, batch.records, self.sampling(batch),
                                    seed=self.generator.config.batch_seed(batch.batch_id),
                                    max_new_tokens=self.budgets(batch.max_new_tokens))
        self.stats.generate_s += time.perf_counter() - t0
        self.send(batch, samples, self.stats.batches)
        self.stats.batches += 1

    def required_version(self, batch: PromptBatch) -> int:
        """The oldest weights that may sample `batch` (its own bound, and `max_staleness` behind the newest
        version any batch announced)."""
        self._announced = max(self._announced, batch.min_policy_version)
        return max(batch.min_policy_version, self._announced - self.max_staleness)

    def await_weights(self, batch: PromptBatch) -> None:
        """Block until the generator holds weights new enough for `batch`, applying updates as they come."""
        required = self.required_version(batch)
        t0 = time.perf_counter()
        while self.generator.version < required:
            update = self.port.wait_weights(required)  # raises ShutdownRequested / PeerDeadError
            if update is None:
                raise RuntimeError(
                    f"batch {batch.batch_id} needs weights v{required}; the transport handed out "
                    f"v{self.port.current_version} but the generator holds v{self.generator.version}"
                )
            self.apply(update)
        waited = time.perf_counter() - t0
        if self.generator.version != batch.min_policy_version or waited > 0.01:
            log.info("batch %d: sampling with v%d (min v%d), waited %.3f s for weights",
                     batch.batch_id, self.generator.version, batch.min_policy_version, waited)
        self.stats.wait_weights_s += waited

    def sampling(self, batch: PromptBatch) -> SamplingConfig:
        """The sampling of `batch`: the generator's, or an evaluation batch's own count and temperature."""
        sampling = self.generator.config.sampling
        if batch.is_eval:
            return dataclasses.replace(sampling, n=batch.eval_samples, temperature=batch.eval_temperature)
        return sampling

    def budgets(self, max_new_tokens: list[int] | None) -> list[int] | None:
        """Per-prompt response budgets from the trainer, capped at this generator's `sampling.max_new_tokens`."""
        if max_new_tokens is None:
            return None
        return [min(m, self.generator.config.sampling.max_new_tokens) for m in max_new_tokens]

    def send(self, batch: PromptBatch, samples: list[Sample], serial: int) -> None:
        """Push `samples` of `batch` (positions in it as their prompt ids) as rollouts; `serial` keeps their ids
        unique when the trainer hands a batch out again."""
        finished_at = time.time()  # with generation_time: the busy interval on the trainer's timeline
        for s in samples:  # the backend's batch positions become the trainer's prompt ids and unique sample ids
            self.port.send_rollout(dataclasses.replace(
                s,
                sample_id=f"{self.port.sender_id}/{batch.batch_id}.{serial}/{s.sample_id}",
                prompt_id=batch.prompt_ids[s.prompt_id],
                finished_at=finished_at,
                eval=batch.is_eval,
            ))
            self.stats.generated_tokens += len(s.response_ids)
        self.stats.rollouts += len(samples)

    def summary(self) -> dict:
        return asdict(self.stats)
