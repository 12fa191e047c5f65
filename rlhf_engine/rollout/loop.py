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
        self._announced = max(self._announced, batch.min_policy_version)
        required = max(batch.min_policy_version, self._announced - self.max_staleness)
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

        t0 = time.perf_counter()
        # an evaluation batch: its own count and temperature, the rest of the generator's sampling
        sampling = (dataclasses.replace(self.generator.config.sampling, n=batch.eval_samples,
                                        temperature=batch.eval_temperature) if batch.is_eval else None)
        # the seed follows the batch, not the generator: a run reproduces whichever generator serves it
        samples = self.episodes.run(batch.prompts, batch.records, sampling or self.generator.config.sampling,
                                    seed=self.generator.config.batch_seed(batch.batch_id))
        self.stats.generate_s += time.perf_counter() - t0
        finished_at = time.time()  # with generation_time: this batch's busy interval on the trainer's timeline
        for s in samples:  # the backend's batch positions become the trainer's prompt ids and unique sample ids
            self.port.send_rollout(dataclasses.replace(
                s,
                # the batch count keeps ids unique when the trainer hands a batch out again
                sample_id=f"{self.port.sender_id}/{batch.batch_id}.{self.stats.batches}/{s.sample_id}",
                prompt_id=batch.prompt_ids[s.prompt_id],
                finished_at=finished_at,
                eval=batch.is_eval,
            ))
            self.stats.generated_tokens += len(s.response_ids)
        self.stats.rollouts += len(samples)
        self.stats.batches += 1

    def summary(self) -> dict:
        return asdict(self.stats)
