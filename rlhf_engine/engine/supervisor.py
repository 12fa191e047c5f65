"""`Supervisor`: keeps a run supplied with generators, and each prompt in flight with one.

Once per poll of the engine's rollout loop (`tend`): a local generator process that exited, or that
the transport dropped from its roster while alive (silent, or holding a weight buffer without an
ack), is replaced (within the restart budget) from the newest weights; the prompts a lost generator
held, and prompts that stalled (no rollout within `engine.reissue_timeout_s`), are handed out
again; a generator that joined since the last publish gets the newest weights over socket frames
(over shared memory it got them at its handshake); with no generator at all for
`engine.no_generator_timeout_s` the run fails. Every rollout goes through the intake (`offer`) with
the senders that completed the handshake on this run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from rlhf_engine.data.samples import Sample
from rlhf_engine.engine.config import RunConfig
from rlhf_engine.engine.generators import GeneratorExited, LocalGenerators, RestartBudgetExceeded
from rlhf_engine.engine.intake import Intake
from rlhf_engine.telemetry.timeline import Timeline
from rlhf_engine.transport import PromptBatch, TrainerPort
from rlhf_engine.transport.errors import BackpressureTimeout
from rlhf_engine.transport.roster import LEFT, LOST, REFUSED, UNACKED

log = logging.getLogger(__name__)

_WHY_LOST = {LOST: "it stopped sending heartbeats", LEFT: "it said goodbye",
             UNACKED: "it held a weight buffer without an ack for transport.ack_timeout_s",
             REFUSED: "it refused the trainer's shared-memory file (is its transport.shm_dir the trainer's?)"}


class NoGeneratorLeft(RuntimeError):
    """No generator, local or external, for `engine.no_generator_timeout_s`."""


class Supervisor:
    """The engine's generators, local and external, as seen from the trainer.

    version / weights: the trainer's current policy version and weights (`(HF name, tensor)`, one at a
    time; on trainer ranks every rank gathers alongside, so the iterator is always drained);
    save_checkpoint: called before the run stops for want of generators (`RestartBudgetExceeded`,
    `NoGeneratorLeft`), so that it can be resumed from the current step.
    """

    def __init__(self, config: RunConfig, port: TrainerPort, local: LocalGenerators, intake: Intake,
                 timeline: Timeline, *, version: Callable[[], int],
                 weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 save_checkpoint: Callable[[], object],
                 records: Callable[[int], dict[str, Any]] | None = None,
                 budgets: Callable[[int], int] | None = None) -> None:
        self.config = config
        self._records = records
        """The dataset record of a prompt id, sent with it for the environment's `reset`; None: no records."""
        self._budgets = budgets
        """The response budget of a prompt id (`data.max_new_tokens_field`); None: the generator's."""
        self.port = port
        self.local = local
        self.intake = intake
        self.timeline = timeline
        self._version = version
        self._weights = weights
        self._save_checkpoint = save_checkpoint
        self._known: set[str] = set()
        self._lost: set[str] = set()
        self._no_generator_since: float | None = None
        self._unacked = 0

    def start(self) -> None:
        """Start the local generators and wait until they and the external ones completed the handshake."""
        e = self.config.engine
        for i in range(e.num_generators):
            self.local.start(i)
        total = e.num_generators + e.external_generators
        if e.external_generators:
            log.info("waiting for %d external generators: rlhf-engine generator --config ... --connect %s",
                     e.external_generators, self.port.endpoint)
        self._await(lambda: len(self.port.generators()) >= total, list(range(e.num_generators)),
                    f"{total} generators to connect to {self.port.endpoint}", "before its handshake")

    def send(self, batch_id: int, prompts: dict[int, list[int]], timeout_s: float | None = None) -> None:
        """Hand `{prompt_id: tokens}` out as batch `batch_id`, sampled with weights no older than the current."""
        records = [self._records(pid) for pid in prompts] if self._records is not None else None
        budgets = [self._budgets(pid) for pid in prompts] if self._budgets is not None else None
        self.port.send_prompts(PromptBatch(batch_id=batch_id, prompt_ids=list(prompts), prompts=list(prompts.values()),
                                           min_policy_version=self._version(), records=records,
                                           max_new_tokens=budgets), timeout_s)

    def offer(self, rollout: Sample) -> None:
        """Pass a rollout from the wire to the intake (which accepts it or counts why not)."""
        if rollout.sender not in self._known:  # may have joined since the last roster read
            self._known.update(g.name for g in self.port.generators())
        self.intake.offer(rollout, rollout.sender, self._known, self._version(), time.monotonic())

    def tend(self) -> None:
        """Replace local generators that exited, re-issue what lost generators held and what stalled,
        and fail once no generator was left for `engine.no_generator_timeout_s`."""
        e = self.config.engine
        self._known.update(g.name for g in self.port.generators())
        for info in self.port.pop_lost_generators():
            self._unacked += info.state == UNACKED
            i = self._local_index(info.name)
            replace = i is not None and info.state != LEFT  # a local process alive but silent or stuck: as a crash
            self._generators_lost([info.name], _WHY_LOST[info.state], process_gone=replace)
            if replace:
                log.warning("%s was dropped from the roster (%s); replacing it", info.name, _WHY_LOST[info.state])
                self._replace(i)
        for i, code in self.local.exited():
            name = self.local.name(i)
            log.warning("%s exited with code %s; replacing it", name, code)
            self._generators_lost([s for s in self._known if s.startswith(name + "@")],
                                  f"its process exited with code {code}", process_gone=True)
            self._replace(i)
        self.port.catch_up_weights(self._version(), self._weights)  # to those that joined since the last publish
        now = time.monotonic()
        self._reissue(self.intake.stalled(now, e.reissue_timeout_s),
                      f"no rollout for them within {e.reissue_timeout_s:g} s (engine.reissue_timeout_s)")
        if self.port.generators() or self.local.running():
            self._no_generator_since = None
        elif self._no_generator_since is None:
            self._no_generator_since = now
        elif now - self._no_generator_since > e.no_generator_timeout_s:
            path = self._save_checkpoint()
            raise NoGeneratorLeft(f"no generator left for {e.no_generator_timeout_s:g} s (engine.no_generator_timeout_s); "
                                  f"a checkpoint of the current step was written: resume with --resume {path}")

    def stats(self) -> dict[str, float]:
        """The cumulative fault and drop counters of the run so far."""
        stats = {"faults/generator_restarts": float(self.local.restarts),
                 "faults/reissued_prompts": float(self.intake.reissued),
                 "faults/late_rollouts": float(self.intake.dropped["late"]),
                 "faults/unacked_generators": float(self._unacked)}
        drops = dict(self.port.drop_counts())
        for reason, n in self.intake.dropped.items():
            drops[reason] = drops.get(reason, 0) + n
        stats.update({f"wire/dropped/{reason}": float(n) for reason, n in sorted(drops.items())})
        return stats

    def _await(self, ready: Callable[[], bool], children: list[int], what: str, when: str) -> None:
        """Poll until `ready()`; `GeneratorExited` (with its log tail) if one of the local `children`
        exits first, `TimeoutError` after the handshake timeout plus two minutes of engine start."""
        t0 = time.monotonic()
        deadline = t0 + self.config.transport.handshake_timeout_s + 120.0
        while not ready():
            for i, _ in self.local.exited(children):
                raise self.local.exit_error(i, when)
            if self.port.rejections:
                raise RuntimeError(f"a generator was refused: {self.port.rejections[-1]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"still waiting for {what} after {time.monotonic() - t0:.0f} s; "
                                   f"see the generator logs in {self.local.run_dir}")
            self.port.raise_if_dead()
            time.sleep(0.1)

    def _local_index(self, sender: str) -> int | None:
        """The index of the local generator process that runs as `sender` now, or None (external, or replaced)."""
        for i in range(self.config.engine.num_generators):
            if sender.startswith(self.local.name(i) + "@"):
                return i
        return None

    def _generators_lost(self, senders: list[str], why: str, *, process_gone: bool = False) -> None:
        """Re-issue what `senders` held (each once); `process_gone`: a local process exited (or is stopped
        now), so the batches waiting in its queue (prompts nobody holds yet) are lost too, even before its
        handshake."""
        new = [s for s in senders if s not in self._lost]
        self._lost.update(new)
        held = {pid for s in new + ([""] if process_gone else []) for pid in self.intake.held_by(s)}
        self._reissue(sorted(held), f"generator {' '.join(senders) or '(before its handshake)'} was lost: {why}")

    def _reissue(self, prompt_ids: list[int], why: str) -> None:
        """Hand `prompt_ids` out again (a batch per step), asking for the newest weights."""
        if not prompt_ids:
            return
        log.warning("re-issuing %d prompts: %s", len(prompt_ids), why)
        for batch_id, prompts in self.intake.reissue(prompt_ids, time.monotonic()).items():
            try:
                self.send(batch_id, prompts, timeout_s=1.0)
            except BackpressureTimeout:  # no generator reads now: they stall and go out again later
                log.warning("could not re-issue %d prompts of batch %d yet: no generator has room", len(prompts), batch_id)

    def _replace(self, i: int) -> None:
        """Restart local generator `i` from the newest weights and wait for its handshake (no new weights
        are published meanwhile, so it samples with them from its first batch). Once the restart budget
        is spent: a checkpoint of the current step, then `RestartBudgetExceeded`."""
        self.local.stop(i, grace_s=0.0)  # whatever it left behind (vLLM engine core, staging files)
        while True:
            try:
                self.local.count_restart()
            except RestartBudgetExceeded as e:
                self._save_checkpoint()
                raise RestartBudgetExceeded(f"{e}; a checkpoint of the current step was written; last exit: "
                                            f"{self.local.exit_error(i, 'at last')}") from None
            t0, t_wall = time.monotonic(), time.time()
            weights = self._save_generator_weights()
            self.local.start(i, weights=weights, version=self._version())
            name = self.local.name(i)
            try:
                self._await(lambda: any(g.name.startswith(name + "@") for g in self.port.generators()), [i],
                            f"{name} to connect", "before its handshake")
            except GeneratorExited as e:
                log.warning("%s", e)
                self.local.stop(i, grace_s=0.0)
                continue
            finally:
                if weights is not None:
                    weights.unlink(missing_ok=True)
            log.warning("%s replaced in %.1f s (weights v%d)", name, time.monotonic() - t0, self._version())
            self.timeline.add("trainer", "replace_generator", t_wall, time.time())
            return

    def _save_generator_weights(self) -> Path | None:
        """The policy's current weights as a safetensors file for a replacement generator (None at v0:
        the policy folder holds them)."""
        if self._version() == 0:
            return None
        from safetensors.torch import save_file

        path = self.local.run_dir / f"generator-weights-v{self._version()}.safetensors"
        # written before anything changes the weights: no copy of CPU tensors; a CUDA trainer's come to the host
        save_file({name: t.detach().contiguous().cpu() for name, t in self._weights()}, str(path))
        return path
