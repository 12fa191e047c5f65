"""The async PPO engine: the trainer in this process, generators in child processes (or elsewhere),
samples and weights between them over the transport.

```python
from rlhf_engine import RLHFEngine, load_run_config
with RLHFEngine(load_run_config("run.yaml")) as engine:
    for stats in engine.steps():
        print(stats["env/reward_mean"])
```

The pipeline: the trainer hands out prompt batches ahead of itself — `1 + max_staleness` in
flight in async mode, one in sync mode — each carrying the oldest policy version allowed to
sample it, so a sample is never more than `max_staleness` versions behind the policy that trains
on it. While the generators sample batch k+1, the trainer scores and trains on batch k, then
publishes its new weights; the generators apply them between batches. With `engine.streaming`, a step
takes the first complete prompt groups from any batch in flight instead of one batch whole, within the same
staleness bound (`Intake.take_streamed`); with `generator.max_inflight`, the generators keep sequences
running across batches and may apply weights between decode steps (`rlhf_engine.rollout.continuous`).

Held-out evaluation (`data.eval_prompts`, `engine.eval_steps`): at step 0, every `eval_steps` steps and at the
end, the trainer hands the evaluation prompts out as tagged batches and waits for them (`rlhf_engine.engine.evaluation`):
they sample the current policy version, are scored like training samples (and by `model.gold_fn`), and are
logged as `eval/*` in that step's metrics (step 0: a record of its own); never trained on.

Faults: a local generator that exits is replaced (within `engine.max_generator_restarts` per
`engine.restart_window_s`; the replacement starts from the newest weights); the prompts a lost
generator held, and those nobody took within `engine.reissue_timeout_s`, are handed out again.
Every rollout passes the `intake` rules before it is trained on; what fails is dropped and
counted (`wire/dropped/<reason>`, `faults/*` in the metrics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf_engine.common.checkpoint import (
    checkpoint_path,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)
from rlhf_engine.common.config_io import to_dict
from rlhf_engine.data.columns import check_columns, completion_columns
from rlhf_engine.data.prompts import PromptSet, PromptStream, read_prompts
from rlhf_engine.data.records import DataError, DataStats
from rlhf_engine.data.samples import Sample, SampleBatch
from rlhf_engine.distributed import Comm
from rlhf_engine.engine.config import RunConfig, import_function, save_run_config
from rlhf_engine.engine.cpu_plan import CpuPlan, TrainerCpus, make_cpu_plan
from rlhf_engine.engine.driver import Leader
from rlhf_engine.engine.episodes import episode_metrics, episode_scores
from rlhf_engine.engine.evaluation import EvalRound, eval_metrics
from rlhf_engine.engine.generators import LocalGenerators
from rlhf_engine.engine.handout import HandOut
from rlhf_engine.engine.intake import Intake, IntakeLimits
from rlhf_engine.engine.preflight import check_run
from rlhf_engine.engine.staleness import length_bias_metrics, token_age_metrics
from rlhf_engine.engine.supervisor import Supervisor
from rlhf_engine.models.reward_scoring import function_scores
from rlhf_engine.rollout.config import run_generator_config
from rlhf_engine.telemetry.files import drop_steps_after, read_jsonl
from rlhf_engine.telemetry.metrics import MetricsLogger
from rlhf_engine.telemetry.timeline import Timeline, idle_fractions
from rlhf_engine.trainer.ppo.checkpoint import check_checkpoint, load_trainer, save_trainer
from rlhf_engine.transport import TrainerPort
from rlhf_engine.transport.config import RECORD_JSON_BYTES
from rlhf_engine.transport.weights import sync_fingerprint, weight_specs

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


class Callback:
    """Hooks into a run; override what you need (all no-ops here)."""

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        """After each PPO step, with its metrics."""

    def on_rollout(self, rollout: Sample) -> None:
        """For every rollout the trainer trains on, just before its step (with the trainer's prompt tokens)."""

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint was written completely."""


class RLHFEngine:
    """An async PPO run: `start()`, then `steps()` / `train()`, then `stop()` (or use `with`).

    resume: a run directory (or checkpoint directory) to continue from; None starts fresh.
    """

    def __init__(self, config: RunConfig, *, callbacks: list[Callback] | None = None,
                 resume: str | Path | None = None, comm: Comm | None = None) -> None:
        self.config = config
        self.comm = comm if comm is not None else Comm()
        """Rank 0 of the trainer's ranks (torchrun); the engine runs on rank 0 only (see `distributed.run`)."""
        self._leader: Leader | None = None
        self.callbacks = list(callbacks or [])
        self.run_dir = Path(config.engine.run_dir)
        self._resume = Path(resume) if resume is not None else None
        self.step = 0
        self.trainer = None
        self.tokenizer = None
        self._port: TrainerPort | None = None
        self._local: LocalGenerators | None = None
        self._intake: Intake | None = None
        self._supervisor: Supervisor | None = None
        self._metrics: MetricsLogger | None = None
        self._timeline: Timeline | None = None
        self._prompts: PromptSet | None = None
        self._handout: HandOut | None = None
        self._dataset_index: dict[int, int] = {}
        self._eval_prompts: PromptSet | None = None
        self._eval_round: EvalRound | None = None
        self._evaluated_initial = False
        """The initial policy was evaluated (step 0)."""
        self._eval_dropped = 0
        """Evaluation rollouts dropped (late, duplicate, bad content)."""
        """The dataset index (`PromptSet` row) of each prompt in flight, by its wire prompt id."""
        self._gold_fn: Callable | None = None
        self._vocab_size = 0
        self._generator_names: dict[str, str] = {}
        self._started_at = 0.0
        self._generated_tokens = 0
        """Response tokens of the samples trained so far."""
        self._trained_samples = 0
        self._stopped = True
        self.cpu_plan: CpuPlan | None = None
        """Cores and threads of the trainer and each generator (`rlhf_engine.engine.cpu_plan`), set by `start`."""
        self._trainer_cpus: TrainerCpus | None = None
        self._sync_lora = run_generator_config(config.generator, config.model.lora).lora
        """The adapters the generators take each version (`model.lora.sync: adapters`), or None: full weights.
        (LoRA trains on one trainer rank: the trainer and `--nproc` refuse more.)"""

    # ----------------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------------
    def start(self) -> "RLHFEngine":
        """Load the models and prompts, start the generators and wait for their handshakes."""
        cfg = self.config
        self._stopped = False
        try:
            ckpt = check_run(cfg, self._resume)  # everything the config and files tell, before any work
            self.run_dir.mkdir(parents=True, exist_ok=True)
            e = cfg.engine
            self.cpu_plan = make_cpu_plan(e.mode, e.num_generators, trainer_threads=e.trainer_threads,
                                          trainer_cpus=e.trainer_cpus, generator_threads=e.generator_threads,
                                          generator_cpus=e.generator_cpus)
            log.info("cpu plan: %s", self.cpu_plan.describe()["phases"])
            self._trainer_cpus = TrainerCpus(self.cpu_plan)  # restored by stop()
            save_run_config(cfg, self.run_dir / CONFIG_FILE)
            if ckpt is not None:  # before the other ranks load it: a bad one fails here
                check_checkpoint(ckpt)
            self.comm.broadcast_str(str(ckpt) if ckpt is not None else "")  # the other ranks load it too
            self._build_trainer(ckpt)
            if cfg.model.gold_fn is not None:
                self._gold_fn = import_function(cfg.model.gold_fn)
            self._build_prompts()  # checks the fields the reward and gold functions take
            if cfg.data.eval_prompts is not None:
                self._eval_prompts = self._read_prompts(cfg.data.eval_prompts, "eval prompts")
            self._intake = Intake(self._intake_limits(cfg.ppo.num_generations))
            state = self._load_state(ckpt) if ckpt is not None else None
            if state is not None:
                self._restore(state)
            # before any process starts: a logger whose package is missing fails here
            self._metrics = MetricsLogger(self.run_dir, loggers=cfg.engine.loggers, total_steps=cfg.engine.total_steps,
                                          progress=cfg.engine.progress, initial_step=self.step, run_config=to_dict(cfg))
            self._timeline = Timeline(self.run_dir)
            self._start_generators()
            if self.trainer.policy_version > 0:  # resumed: generators load the initial weights from disk
                self._publish_weights()
            self._started_at = time.time()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the generators (politely, then by force), close the transport and the logs. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._leader is not None:
            try:  # the other trainer ranks leave their loop; inside an op they end through the failure channel
                if not self._leader.stop():
                    log.warning("the other trainer ranks are inside a %s that did not complete; they end through "
                                "the failure channel", self._leader.busy.name)
            except Exception as e:  # a rank died: torchrun stops the others; the generators are stopped below
                log.warning("could not release the other trainer ranks: %s", e)
        if self._port is not None:
            try:
                self._port.shutdown_generators("engine stopping")
            except Exception as e:  # the port may already be broken; the children are still stopped below
                log.warning("could not ask the generators to stop: %s", e)
        try:
            if self._local is not None:
                self._local.stop_all(grace_s=10.0)
        finally:  # a second signal (torchrun stopping the ranks) must not leak the port's shared memory
            if self._port is not None:
                self._port.close()
                self._port = None
            for sink in (self._metrics, self._timeline):
                if sink is not None:
                    sink.close()
            if self._trainer_cpus is not None:
                self._trainer_cpus.restore()
                self._trainer_cpus = None

    def abandon(self) -> None:
        """Release what would outlive this process (the transport's shared memory) when it must end at once:
        stuck in a collective after another trainer rank failed (`distributed.failure`). The local
        generators end with it (they get SIGTERM when their parent dies)."""
        if self._port is not None:
            self._port.close()

    @property
    def endpoint(self) -> str:
        """Where generators connect (`rlhf-engine generator --connect ENDPOINT`); known once started."""
        if self._port is None:
            raise RuntimeError("the engine is not started")
        return self._port.endpoint

    def __enter__(self) -> "RLHFEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------
    # the run
    # ----------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Run `steps` PPO steps (default: to `engine.total_steps`); returns their metrics."""
        return list(self.steps(steps))

    def steps(self, steps: int | None = None) -> Iterator[dict[str, float]]:
        """Run PPO steps one at a time, yielding each step's metrics."""
        if self._stopped:
            raise RuntimeError("the engine is not started: call start() or use `with RLHFEngine(...)`")
        cfg = self.config.engine
        last = cfg.total_steps if steps is None else min(cfg.total_steps, self.step + steps)
        if cfg.eval_steps and self.step == 0 and not self._evaluated_initial and last > 0:
            self._metrics.log(0, {**self._evaluate(), "step": 0})  # the initial policy
            self._evaluated_initial = True
        while self.step < last:
            t_step = time.time()
            # 1. keep the pipeline full: batches up to step + in_flight - 1 are handed out
            self._fill_pipeline(last)
            # 2. wait for this step's rollouts (the generators sample ahead meanwhile)
            t0 = time.time()
            rollouts = self._collect(self.step)
            t_wait = time.time() - t0
            # 3. PPO step: score, experience, advantages, epochs over minibatches
            t0 = time.time()
            version_before = self.trainer.policy_version
            stats = self._ppo_step(rollouts)
            self._timeline.add("trainer", "ppo_step", t0, time.time())
            # 4. publish the new weights (a step skipped for non-finite values may still have changed them), but
            #    not the run's last ones unless the final evaluation samples them: no generator would use them
            t0 = time.time()
            final = self.step + 1 == cfg.total_steps
            evaluate = bool(cfg.eval_steps) and ((self.step + 1) % cfg.eval_steps == 0 or final)
            if self.trainer.policy_version != version_before and (evaluate or not final):
                self._publish_weights()
            self._timeline.add("trainer", "weight_sync", t0, time.time())
            stats["time/engine/weight_sync"] = time.time() - t0
            # 5. held-out evaluation of the new weights, every eval_steps and at the end
            if evaluate:
                stats.update(self._evaluate())
            stats["time/engine/wait_rollouts"] = t_wait
            stats["time/engine/step"] = time.time() - t_step
            self.step += 1
            stats.update(self._supervisor.stats())
            stats["step"] = self.step
            self._metrics.log(self.step, stats)
            for cb in self.callbacks:
                cb.on_step(self.step, stats)
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.total_steps:
                self.save_checkpoint()
            yield stats

    def save_checkpoint(self) -> Path:
        """Write a sharded checkpoint of the current step atomically (every trainer rank joins; one format at
        any world size, `distributed.dcp`); returns its directory."""
        t0 = time.time()
        state = {"step": self.step, **self._handout.state_dict(), "rng": rng_state()}  # + the trainer's (save_trainer)
        path = self._leader.save(checkpoint_path(self.run_dir, self.step), state)
        self._timeline.add("trainer", "checkpoint", t0, time.time())
        for cb in self.callbacks:
            cb.on_checkpoint(path)
        return path

    def summary(self) -> dict[str, Any]:
        """Run-level numbers: steps, wall time, generated tokens/s, idle fraction of each process."""
        end = time.time()
        intervals = read_jsonl(self.run_dir / "timeline.jsonl")
        intervals = [iv for iv in intervals if iv["end"] >= self._started_at]
        wall = max(end - self._started_at, 1e-9)
        return {
            "steps": self.step,
            "wall_s": wall,
            "generated_tokens_per_s": self._generated_tokens / wall,
            "idle_fraction": idle_fractions(intervals, self._started_at, end),
        }

    # ----------------------------------------------------------------------------------------------
    # pieces
    # ----------------------------------------------------------------------------------------------
    def _intake_limits(self, samples: int) -> IntakeLimits:
        """What a rollout may hold, `samples` per prompt (with an environment, its own prompt tokens)."""
        cfg = self.config
        return IntakeLimits(vocab_size=self._vocab_size, response_length=cfg.ppo.response_length,
                            num_generations=samples,
                            env_prompt_tokens=0 if self._single_turn else cfg.data.max_prompt_length)

    @property
    def _single_turn(self) -> bool:
        """No environment: prompts as the trainer tokenized them, no records sent, scores all the trainer's."""
        return self.config.generator.environment.single_turn

    def _build_trainer(self, ckpt: Path | None) -> None:
        from rlhf_engine.engine.build_trainer import build_ppo_trainer

        self.trainer, self.tokenizer = build_ppo_trainer(self.config, ckpt, self.comm)
        self._vocab_size = self.trainer.model.pretrained_model.get_input_embeddings().num_embeddings
        self._leader = Leader(self.comm, self.trainer, self._save_sharded)

    # ---- checkpoints: sharded (DCP) at every world size; the followers join through the leader ----
    def _save_sharded(self, final: Path, state: dict[str, Any]) -> Path:
        path = save_trainer(self.comm, final, self.trainer, state)
        prune_checkpoints(self.run_dir, self.config.engine.keep_last)
        return path

    def _load_state(self, ckpt: Path) -> dict[str, Any]:
        """Put the checkpoint's models, optimizer and trainer state back; returns the rest of its state."""
        return load_trainer(ckpt, self.trainer)

    def _build_prompts(self) -> None:
        self._prompts = self._read_prompts(self.config.data.prompts, "prompts")
        field = self.config.data.max_new_tokens_field
        for i, where in enumerate(self._prompts.wheres if field is not None else []):
            budget = self._prompts.columns[i].get(field)
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise DataError(f"{where}: data.max_new_tokens_field {field!r} must be an int >= 1, got {budget!r}")
        stream = PromptStream(self._prompts.token_ids, seed=self.config.ppo.seed, shuffle=self.config.data.shuffle)
        self._handout = HandOut(stream, self.config.prompts_per_step)

    def _read_prompts(self, source: str, name: str) -> PromptSet:
        """The prompts of `source`, with a `DataError` (file:line, field, function) when the reward or gold
        function takes a field some record lacks: before any generator starts."""
        stats = DataStats(name)
        prompts = read_prompts(source, self.tokenizer, self.config.data.max_prompt_length, stats)
        log.info(stats.summary())
        m = self.config.model
        for fn, setting in ((self.trainer.reward_fn, f"model.reward_fn ({m.reward_fn})"),
                            (self._gold_fn, f"model.gold_fn ({m.gold_fn})")):
            if fn is not None:
                check_columns(fn, setting, prompts.columns, prompts.wheres)
        if not self._single_turn:  # each record travels to the generators with its prompt
            for i, where in enumerate(prompts.wheres):
                size = len(json.dumps(prompts.record(i)).encode())
                if size > RECORD_JSON_BYTES:
                    raise DataError(f"{where}: the record is {size} bytes of JSON; an environment's records travel "
                                    f"to the generators, at most {RECORD_JSON_BYTES} bytes each")
        return prompts

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._handout.load_state_dict(state, self.step)
        set_rng_state(state["rng"])
        drop_steps_after(self.run_dir, self.step)  # the steps after the checkpoint are run again
        log.info("resumed at step %d (policy version %d)", self.step, self.trainer.policy_version)

    def _start_generators(self) -> None:
        cfg, e = self.config, self.config.engine
        # the generators fingerprint the policy folder they load (names, shapes, stored dtypes) and the adapters
        # they take; every update is checked against exactly what is published (a dtype mismatch fails here)
        policy, lora = cfg.model.policy, self._sync_lora
        self._port = TrainerPort(cfg.transport, sync_fingerprint(policy, lora), weight_specs=weight_specs(policy, lora))
        self._local = LocalGenerators(self.run_dir / CONFIG_FILE, self.run_dir, self._port.endpoint,
                                      cfg.transport.shm_dir, cpu_plan=self.cpu_plan, max_restarts=e.max_generator_restarts,
                                      window_s=e.restart_window_s)
        self._supervisor = Supervisor(cfg, self._port, self._local, self._intake, self._timeline,
                                      version=lambda: self.trainer.policy_version,
                                      weights=self._sync_weights, save_checkpoint=self.save_checkpoint,
                                      records=None if self._single_turn else self._record,
                                      budgets=None if cfg.data.max_new_tokens_field is None else self._budget)
        self._supervisor.start()

    def _record(self, prompt_id: int) -> dict[str, Any]:
        """The dataset record of the training prompt `prompt_id` (wire id), for the environment's `reset`."""
        return self._prompts.record(self._dataset_index[prompt_id])

    def _budget(self, prompt_id: int) -> int:
        """The response budget of the training prompt `prompt_id` (wire id): its `data.max_new_tokens_field`."""
        return int(self._prompts.columns[self._dataset_index[prompt_id]][self.config.data.max_new_tokens_field])

    def _fill_pipeline(self, last_step: int) -> None:
        handout = self._handout
        while handout.next_batch < min(self.step + self.config.engine.batches_in_flight, last_step):
            b = handout.next_batch
            drawn = handout.draw()
            prompts = {pid: p.token_ids for pid, p in drawn.items()}
            self._dataset_index.update({pid: p.prompt_id for pid, p in drawn.items()})
            self._intake.issue(b, prompts, self.trainer.policy_version, time.monotonic())
            if prompts:  # after a resume, a batch may hold only prompts trained before it
                self._supervisor.send(b, prompts)

    def _collect(self, step: int) -> list[Sample]:
        """Receive rollouts until step `step` can be taken (keeping the others), tending the generators
        meanwhile: batch `step` complete, or streaming (`engine.streaming`), `prompts_per_step` complete
        groups that keep the staleness bound (`Intake.take_streamed`). Its rollouts, grouped by prompt."""
        cfg, e = self.config, self.config.engine
        deadline = time.monotonic() + e.rollout_timeout_s
        while (rollouts := self._take(step)) is None:
            self._port.raise_if_dead()
            self._supervisor.tend()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"step {step}: no {cfg.prompts_per_step} complete prompts of {cfg.ppo.num_generations} rollouts "
                    f"after {e.rollout_timeout_s} s (engine.rollout_timeout_s); {self._intake.accepted} rollouts "
                    f"accepted in all; live generators: {[g.name for g in self._port.generators()]}")
            for r in self._port.recv_rollouts(cfg.ppo.batch_size, timeout_s=0.5):
                self._offer(r)
        self._handout.trained(sorted({r.prompt_id for r in rollouts}))
        self._record_generation(rollouts)
        for r in rollouts:
            self._generated_tokens += int(r.response_ids.numel())
            self._trained_samples += 1
            for cb in self.callbacks:
                cb.on_rollout(r)
        return rollouts

    def _take(self, step: int) -> list[Sample] | None:
        """The rollouts of step `step` if they can be taken now, else None."""
        e = self.config.engine
        if e.streaming:
            return self._intake.take_streamed(self.config.prompts_per_step, self.trainer.policy_version,
                                              e.max_staleness)
        return self._intake.take(step) if self._intake.complete(step) else None

    def _offer(self, rollout: Sample) -> None:
        """A rollout from the wire to the training intake, or to the evaluation round when tagged `eval`."""
        if not rollout.eval:
            self._supervisor.offer(rollout)
        elif self._eval_round is None or not self._eval_round.offer(rollout, {g.name for g in self._port.generators()},
                                                                    time.monotonic()):
            self._eval_dropped += 1

    def _evaluate(self) -> dict[str, float]:
        """One evaluation round of `data.eval_prompts` with the current weights: hand it out, wait for it
        (tending the generators, taking training rollouts meanwhile), score it; its `eval/*` metrics."""
        cfg, e = self.config, self.config.engine
        t0 = time.time()
        version = self.trainer.policy_version
        records = None if self._single_turn else [self._eval_prompts.record(i) for i in range(len(self._eval_prompts))]
        rnd = EvalRound(self._eval_prompts.token_ids, samples=e.eval_samples, temperature=e.eval_temperature,
                        version=version, limits=self._intake_limits(e.eval_samples),
                        max_batch_prompts=cfg.transport.max_batch_prompts, now=time.monotonic(), records=records)
        self._eval_round = rnd
        try:
            for b in rnd.batches:
                self._port.send_prompts(b)
            deadline = time.monotonic() + e.rollout_timeout_s
            while not rnd.complete():
                self._port.raise_if_dead()
                self._supervisor.tend()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"evaluation at step {self.step}: incomplete after {e.rollout_timeout_s} s "
                                       f"(engine.rollout_timeout_s); live generators: "
                                       f"{[g.name for g in self._port.generators()]}")
                for b in rnd.stalled(time.monotonic(), e.reissue_timeout_s):
                    log.warning("evaluation: handing %d prompts out again (nothing came within %g s)",
                                len(b.prompt_ids), e.reissue_timeout_s)
                    self._port.send_prompts(b)
                for r in self._port.recv_rollouts(cfg.ppo.batch_size, timeout_s=0.5):
                    self._offer(r)
        finally:
            self._eval_round = None
        self._eval_dropped += sum(rnd.dropped.values())
        samples = rnd.samples()
        queries = [r.prompt_ids for r in samples]
        responses = [r.response_ids for r in samples]
        rows = [self._eval_prompts.columns[r.prompt_id] for r in samples]
        names = self._eval_prompts.column_names
        scored = SampleBatch(queries, responses, columns=completion_columns(rows, self.trainer.reward_fn, names))
        rewards = episode_scores(samples, self._trainer_scores(scored))
        if rewards is None:
            rewards = self._leader.score(scored)
        gold = None
        if self._gold_fn is not None:
            gold = function_scores(self._gold_fn, self.tokenizer.batch_decode(queries, skip_special_tokens=True),
                                   self.tokenizer.batch_decode(responses, skip_special_tokens=True),
                                   completion_columns(rows, self._gold_fn, names), setting="model.gold_fn")
        stats = eval_metrics(rewards.float().cpu(), gold, torch.tensor([len(r) for r in responses]),
                             torch.tensor([r.prompt_id for r in samples]),
                             torch.tensor([r.policy_version for r in samples]))
        stats["eval/dropped_rollouts"] = float(self._eval_dropped)
        if not self._single_turn:
            stats.update(episode_metrics(samples, prefix="eval/"))
        stats["time/engine/eval"] = time.time() - t0
        self._timeline.add("trainer", "eval", t0, time.time())
        return stats

    def _record_generation(self, rollouts: list[Sample]) -> None:
        """Add the generators' busy intervals of `rollouts` to the timeline (from their timestamps)."""
        for finished_at, seconds, sender in {(r.finished_at, r.generation_time, r.sender) for r in rollouts}:
            if finished_at > 0:
                name = self._generator_names.setdefault(sender, f"generator-{len(self._generator_names)}")
                self._timeline.add(name, "generate", finished_at - seconds, finished_at)

    def _ppo_step(self, rollouts: list[Sample]) -> dict[str, float]:
        rollouts = sorted(rollouts, key=lambda r: r.prompt_id)  # stable: group members stay together
        queries = [r.prompt_ids for r in rollouts]
        responses = [r.response_ids for r in rollouts]
        # the records' fields by prompt id, one row per completion (a prompt's row repeated for its group)
        rows = [self._prompts.columns[self._dataset_index[r.prompt_id]] for r in rollouts]
        for pid in {r.prompt_id for r in rollouts}:
            del self._dataset_index[pid]
        batch = SampleBatch.from_samples(rollouts, columns=completion_columns(rows, self.trainer.reward_fn,
                                                                              self._prompts.column_names))
        batch.scores = episode_scores(rollouts, self._trainer_scores(batch))  # None: the trainer scores them
        version = self.trainer.policy_version
        stats = self._leader.step(batch)  # every trainer rank joins (one rank: the plain step)
        stats.update(token_age_metrics(rollouts, version, self.config.engine.max_staleness))
        stats.update(length_bias_metrics(self._trained_samples, self._generated_tokens, self._intake.accepted,
                                         self._intake.accepted_tokens))
        stats["env/generated_tokens"] = float(sum(int(r.numel()) for r in responses))
        if not self._single_turn:
            stats.update(episode_metrics(rollouts))
        if self._gold_fn is not None:
            prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
            completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            gold = function_scores(self._gold_fn, prompts, completions,
                                   completion_columns(rows, self._gold_fn, self._prompts.column_names),
                                   setting="model.gold_fn")
            stats["env/gold_mean"] = float(gold.mean())
        return stats

    def _trainer_scores(self, batch: SampleBatch) -> Callable[[], torch.Tensor] | None:
        """The reward function's or model's scores of `batch`, on demand (every rank joins); None without either."""
        if self.trainer.reward_fn is None and self.trainer.reward_model is None:
            return None
        return lambda: self._leader.score(batch)

    def _sync_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What the generators take each version: the one accessor (`PPOTrainer.policy_weights`, see
        `transport.weights.policy_weights`) through the rank driver, `(name, tensor)` one at a time at every
        world size: the LoRA adapters (`model.lora.sync: adapters`), else the full policy weights (merged with the
        adapters under LoRA; gathered from every rank's shards when the trainer is distributed, which the publish
        streams into shared memory)."""
        return self._leader.weights(adapters=self._sync_lora is not None)

    def _publish_weights(self) -> None:
        self._port.publish_weights(self.trainer.policy_version, self._sync_weights())
