"""`EpisodeRunner`: a batch of prompts played out as episodes of an environment, token in, token out.

Every batch a generator serves goes through here; a run without an environment plays `SingleTurn`
(one turn on the trainer's prompt), which is the same `Generator.generate` call as ever.

    reset every episode (environment threads)
    turn 1: one `generate(openings, n)` call, the n episodes of a prompt are its n samples
    loop:   each finished turn goes to its environment's `step` (threads); as results come back, the
            episodes that go on are batched into the next `generate` call (n = 1 each, the whole token
            sequence so far as the prompt), so a slow step holds up only its own episode (with
            `lockstep`, the call waits for every running step: reproducible, but a slow step holds up all)
    close every environment

Token in, token out: a sampled turn is appended as the sampler's ids with their log-probs and versions
(`loss_mask` True); observations are appended as the chat template's delta (`envs.template.ChatTemplate`;
`loss_mask` False, log-prob 0), after the template's end-of-turn token when the turn stopped without one
(a stop string, or the token limit of a turn). The environment reads the decoded turn; nothing is ever
re-encoded. Every token after the prompt counts toward the budget (`sampling.max_new_tokens`, the run's
`ppo.response_length`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import logging
import math
import queue
import threading
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf_engine.data.samples import MAX_INFO_KEYS, EpisodeInfo, Sample
from rlhf_engine.envs.protocol import EnvironmentConfig, StepResult, check_messages
from rlhf_engine.rollout.config import SamplingConfig
from rlhf_engine.rollout.generator import Generator

log = logging.getLogger(__name__)

GATHER_S = 0.01
"""After one environment step returns, how long the others may take to join the same `generate` call."""
SUMMED_INFO = ("tool_calls", "tool_errors", "tool_timeouts")
"""`StepResult.info` entries summed over an episode into `EpisodeInfo`."""
MAX_COUNT = 1 << 20
"""Largest `SUMMED_INFO` count one step may report."""


@dataclass
class _Episode:
    """One episode being played: the trajectory so far and its bookkeeping."""

    prompt: int
    sample: int
    env: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    reward: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUMMED_INFO, 0))
    metrics: dict[str, float] = field(default_factory=dict)
    env_seconds: float = 0.0
    truncated: str | None = None
    """None while it runs; then "" (the environment ended it) or the reason it was cut."""


class EpisodeRunner:
    """Plays batches of episodes of `config`'s environment on `generator` (see the module docstring)."""

    def __init__(self, generator: Generator, config: EnvironmentConfig, *, max_prompt_tokens: int) -> None:
        self.generator = generator
        self.config = config
        self.max_prompt_tokens = max_prompt_tokens
        """Openings rendered from `reset`'s messages keep their last `max_prompt_tokens` tokens."""
        self._loop = _EventLoop()
        self._check_builds(config)  # a name or kwargs that do not fit fail here, not in every episode
        self.template = None
        if not config.single_turn:
            from rlhf_engine.envs.template import ChatTemplate

            self.template = ChatTemplate(generator.tokenizer)
        self._pool: _DaemonPool | None = None
        self._over = threading.Event()
        self._calls = 0
        """`generate` calls of the batch being played after its first turn (they seed `seed + calls * 7919`)."""

    def _check_builds(self, config: EnvironmentConfig) -> None:
        """Build (and close) one environment: `ValueError` in one line when the class or its kwargs do not fit."""
        config.resolve()  # its own one-line error
        try:
            env = config.build()
        except Exception as e:
            raise ValueError(f"environment {config.name} with kwargs {config.kwargs}: {type(e).__name__}: {e}") from e
        _, error, _ = _timed(env.close, self._loop)
        if error is not None:
            raise ValueError(f"environment {config.name}: close() of a fresh instance failed: {error}")

    def run(self, prompts: list[list[int]], records: list[dict] | None, sampling: SamplingConfig,
            seed: int, max_new_tokens: list[int] | None = None) -> list[Sample]:
        """`sampling.n` episodes per prompt; returns their samples ordered by (prompt, sample), as
        `Generator.generate` does. `records[i]` is prompt i's dataset record for `reset` (None: `{}`).
        `max_new_tokens`: each prompt's response budget, single-turn runs only."""
        if max_new_tokens is not None and not self.config.single_turn:
            raise ValueError(f"per-prompt response budgets are for single-turn runs; the environment "
                             f"{self.config.name} plays episodes within sampling.max_new_tokens")
        t0 = time.perf_counter()
        episodes = [_Episode(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        # the threads of this batch; a call still running past its time limit is left to its daemon thread,
        # which never holds up the process's exit
        self._pool = _DaemonPool(min(self.config.concurrency, len(episodes)))
        self._over = threading.Event()
        """Set when the batch closes its environments."""
        self._calls = 0
        try:
            self._reset(episodes, prompts, records or [{}] * len(prompts), sampling.n)
            self._first_turn(episodes, sampling, seed, max_new_tokens)
            self._play(episodes, sampling, seed)
        finally:  # whatever happened (a generate call may raise), every environment is closed
            self._close_all(episodes)
            self._pool.shutdown()
        elapsed = time.perf_counter() - t0
        return [self._sample(ep, elapsed) for ep in episodes]

    # -- the phases of `run` ------------------------------------------------------------------------------

    def _reset(self, episodes: list[_Episode], prompts: list[list[int]], records: list[dict],
               n: int) -> None:
        """Build and reset every episode's environment. The n episodes of a prompt are one group (GRPO / RLOO
        compare them) and open alike: with `reset`'s messages rendered (the first that rendered), else with the
        trainer's prompt. An episode whose environment failed, or opened otherwise than its group, gets the
        group's opening and ends after its first turn (its sample is not trained on)."""
        over = self._over

        def start(ep: _Episode):
            env = self.config.build()
            if over.is_set():  # built after its batch gave up on it (and closed the others): close it here
                _timed(env.close, self._loop)
                raise TimeoutError("built after the batch ended")
            ep.env = env
            return env.reset(copy.deepcopy(records[ep.prompt]))  # each its own: an environment may change it

        openings: list[list[int] | None] = []
        for ep, (value, error, seconds) in zip(episodes, self._call_all([lambda ep=ep: start(ep) for ep in episodes])):
            ep.env_seconds += seconds
            opening = None
            if error is None and value is not None:
                try:
                    opening = self.template.prompt_ids(check_messages(value, "reset"))[-self.max_prompt_tokens:]
                except ValueError as e:
                    error = f"env_error: {e}"
            if error is not None:
                self._end(ep, error)
            openings.append(opening)
        for g in range(0, len(episodes), n):
            group, opened = episodes[g:g + n], openings[g:g + n]
            first = next((o for ep, o in zip(group, opened) if ep.truncated is None), None)
            for ep, opening in zip(group, opened):
                ep.prompt_ids = list(first) if first is not None else list(prompts[ep.prompt])
                if ep.truncated is None and opening != first:
                    self._end(ep, "env_error: reset opened this episode otherwise than the other episodes of its "
                                  "prompt (one GRPO group: they must open alike)")

    def _first_turn(self, episodes: list[_Episode], sampling: SamplingConfig, seed: int,
                    max_new_tokens: list[int] | None) -> None:
        """Turn 1: one `generate` call with n samples per prompt (a group opens alike, see `_reset`)."""
        n = sampling.n
        budget = sampling.max_new_tokens
        sampling = dataclasses.replace(sampling, max_new_tokens=min(budget, self.config.max_turn_tokens or budget))
        samples = self.generator.generate([episodes[g].prompt_ids for g in range(0, len(episodes), n)],
                                          sampling=sampling, seed=seed, max_new_tokens=max_new_tokens)
        for ep, sample in zip(episodes, samples):
            self._append_turn(ep, sample, budget)

    def _play(self, episodes: list[_Episode], sampling: SamplingConfig, seed: int) -> None:
        """Steps and later turns until every episode has ended (`EnvironmentConfig.lockstep`: a turn's call waits
        for every running step); a step still running `step_timeout_s` after it started ends its episode."""
        lockstep = self.config.lockstep
        pending: dict[Future, _Episode] = {}  # step call -> its episode
        for ep in episodes:
            if ep.truncated is None:
                pending[self._submit_step(ep)] = ep
        ready: list[_Episode] = []
        while pending or ready:
            if pending:
                done, _ = wait(pending, timeout=self._next_expiry(pending),
                               return_when=ALL_COMPLETED if lockstep else FIRST_COMPLETED)
                if done and not lockstep:  # the steps that finish about now join the same turn
                    done |= wait(set(pending) - done, timeout=GATHER_S)[0]
                for future in list(pending):
                    if future in done:
                        ep = pending.pop(future)
                        value, error, seconds = future.result()
                        ep.env_seconds += seconds
                        if self._apply_step(ep, value, error, sampling.max_new_tokens):
                            ready.append(ep)
                    elif self._expired(future):
                        ep = pending.pop(future)
                        ep.env_seconds += self.config.step_timeout_s
                        self._end(ep, "step_timeout")
            if ready and not (lockstep and pending):
                for ep in self._next_turn(ready, sampling, seed):
                    pending[self._submit_step(ep)] = ep
                ready = []

    def _next_turn(self, ready: list[_Episode], sampling: SamplingConfig, seed: int) -> list[_Episode]:
        """One `generate` call for the episodes in `ready`; returns those that go on to a step."""
        budget = sampling.max_new_tokens
        room = max(budget - len(ep.ids) for ep in ready)
        cap = min(room, self.config.max_turn_tokens or budget)
        self._calls += 1
        turn = dataclasses.replace(sampling, n=1, max_new_tokens=cap)
        samples = self.generator.generate([ep.prompt_ids + ep.ids for ep in ready], sampling=turn,
                                          seed=(seed + self._calls * 7_919) % (1 << 31))
        for ep, sample in zip(ready, samples):
            self._append_turn(ep, sample, budget)
        return [ep for ep in ready if ep.truncated is None]

    def _close_all(self, episodes: list[_Episode]) -> None:
        """`close` every environment built (errors are logged: the episode is over either way). One whose build
        overran its limit may be built later by its thread, which then closes it (`_reset`)."""
        self._over.set()
        built = [ep for ep in episodes if ep.env is not None]
        for ep, (_, error, _) in zip(built, self._call_all([ep.env.close for ep in built])):
            if error is not None:
                log.warning("environment close failed (prompt %d, sample %d): %s", ep.prompt, ep.sample, error)

    # -- one episode --------------------------------------------------------------------------------------

    def _append_turn(self, ep: _Episode, sample: Sample, budget: int) -> None:
        """Append a sampled turn (cut at the budget), then end the episode if it cannot go on."""
        room = budget - len(ep.ids)
        ep.turn_starts.append(len(ep.ids))
        ids = sample.response_ids[:room].tolist()
        ep.ids += ids
        ep.mask += [True] * len(ids)
        ep.logp += sample.behaviour_logp[:room].tolist()
        ep.versions += sample.policy_versions[:room].tolist()
        ep.finish_reason = sample.finish_reason
        if ep.truncated is not None:  # the environment failed at reset: this turn is the last
            return
        if len(ids) < sample.response_ids.numel():  # cut at the budget: the environment never sees it
            self._end(ep, "token_budget")

    def _submit_step(self, ep: _Episode) -> Future:
        tokens = ep.ids[ep.turn_starts[-1]:]
        text = self.generator.tokenizer.decode(tokens, skip_special_tokens=True)
        return self._submit(lambda: ep.env.step({"role": "assistant", "content": text}))

    def _apply_step(self, ep: _Episode, value: Any, error: str | None, budget: int) -> bool:
        """Take a step's result; True when the episode goes on to another turn. Whatever the environment returned
        that cannot be used (wrong types, numbers past any range, messages the template cannot render) ends the
        episode as an environment error."""
        if error is None:
            try:
                return self._take_step(ep, StepResult.of(value), budget)
            except Exception as e:
                error = f"env_error: {type(e).__name__}: {e}"
        self._end(ep, error)
        return False

    def _take_step(self, ep: _Episode, result: StepResult, budget: int) -> bool:
        if result.reward is not None:
            total = (ep.reward or 0.0) + float(result.reward)
            if not math.isfinite(total):  # finite steps can overflow
                raise ValueError("the sum of the step rewards overflowed")
            ep.reward = total
        for name in SUMMED_INFO:
            count = result.info.get(name, 0)
            if isinstance(count, bool) or not isinstance(count, (int, float)) or not 0 <= count <= MAX_COUNT:
                raise ValueError(f"info[{name!r}] must be a count in [0, {MAX_COUNT}], got {count!r}")
            ep.counts[name] += int(count)
        numbers = [(k, float(v)) for k, v in result.info.items() if k not in SUMMED_INFO and isinstance(k, str)
                   and 0 < len(k) <= 64 and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(float(v))]
        ep.metrics = dict(numbers[:MAX_INFO_KEYS])
        if result.done:
            self._end(ep, "")
            return False
        if len(ep.turn_starts) >= self.config.max_turns:
            self._end(ep, "max_turns")
            return False
        ended = bool(ep.ids) and ep.ids[-1] == self.template.end_of_turn_id
        observation = self.template.observation_ids(result.observations, turn_ended=ended)
        if len(ep.ids) + len(observation) >= budget:  # no room for the observation and one more token
            self._end(ep, "token_budget")
            return False
        version = ep.versions[-1] if ep.versions else self.generator.version
        ep.ids += observation
        ep.mask += [False] * len(observation)
        ep.logp += [0.0] * len(observation)
        ep.versions += [version] * len(observation)
        return True

    def _end(self, ep: _Episode, reason: str) -> None:
        if ep.truncated is None:
            ep.truncated = reason
            if reason and reason not in ("max_turns", "token_budget"):
                log.warning("episode (prompt %d, sample %d) ended: %s", ep.prompt, ep.sample, reason[:300])

    def _sample(self, ep: _Episode, elapsed: float) -> Sample:
        reason = ep.truncated or ""
        kind = reason.split(":", 1)[0]
        return Sample(
            sample_id=f"{ep.prompt}/{ep.sample}",
            prompt_id=ep.prompt,
            prompt_ids=torch.tensor(ep.prompt_ids, dtype=torch.int64),
            response_ids=torch.tensor(ep.ids, dtype=torch.int64),
            behaviour_logp=torch.tensor(ep.logp, dtype=torch.float32),
            policy_versions=torch.tensor(ep.versions, dtype=torch.int64),
            finish_reason=ep.finish_reason,
            loss_mask=torch.tensor(ep.mask, dtype=torch.bool),
            generation_time=elapsed,
            turn_starts=torch.tensor(ep.turn_starts, dtype=torch.int64),
            reward=ep.reward,
            episode=EpisodeInfo(turns=len(ep.turn_starts), **ep.counts, env_seconds=ep.env_seconds,
                                truncated=kind, metrics=ep.metrics),
        )

    # -- environment calls --------------------------------------------------------------------------------

    def _call_all(self, calls: list[Callable[[], Any]]) -> list[tuple[Any, str | None, float]]:
        """Run `calls` on the environment threads; each one's (value, error or None, seconds), in order; a call
        still running `step_timeout_s` after it started gives the error `step_timeout`."""
        futures = [self._submit(call) for call in calls]
        running = set(futures)
        timed_out = set()
        while running:
            running = {f for f in running if not f.done()}
            expired = {f for f in running if self._expired(f)}
            timed_out |= expired
            running -= expired
            if running:
                wait(running, timeout=self._next_expiry(running), return_when=FIRST_COMPLETED)
        return [(None, "step_timeout", self.config.step_timeout_s) if f in timed_out else f.result() for f in futures]

    def _submit(self, call: Callable[[], Any]) -> Future:
        return self._pool.submit(_timed, call, self._loop)

    def _expired(self, future: Future) -> bool:
        """`future`'s call has run `step_timeout_s` without returning: its thread is given up (and replaced)."""
        started = getattr(future, "started_at", None)
        if future.done() or started is None or time.monotonic() - started < self.config.step_timeout_s:
            return False
        self._pool.replace()
        return True

    def _next_expiry(self, futures) -> float:
        """Seconds until the first of `futures` that has started can expire (a queued one waits for a thread,
        which the running calls free within their limit)."""
        starts = [f.started_at for f in futures if getattr(f, "started_at", None) is not None]
        first = min(starts, default=time.monotonic()) + self.config.step_timeout_s
        return max(0.0, first - time.monotonic()) + 1e-3

class _DaemonPool:
    """Daemon threads running submitted environment calls (`concurrent.futures`' pool joins its threads at exit,
    so one stuck call would hang the generator's exit). Each future gets `started_at` (monotonic) when a thread
    takes it; `replace` adds a thread for one left running past its time limit, so `n` stay available."""

    def __init__(self, n: int) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        for _ in range(n):
            self.replace()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def replace(self) -> None:
        threading.Thread(target=self._work, name=f"env-{self._threads}", daemon=True).start()
        self._threads += 1

    def shutdown(self) -> None:
        for _ in range(self._threads):
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            future.started_at = time.monotonic()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # `_timed` catches everything; this keeps the thread serving
                    future.set_exception(e)


class _EventLoop:
    """One event loop on a daemon thread for the environments' coroutines: an `async def` environment keeps
    loop-bound state (tasks, clients, subprocesses) from one call to the next, as on any single loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="env-loop", daemon=True).start()

    def wait(self, awaitable) -> Any:
        """The result of `awaitable`, run on the loop (called from an environment thread)."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()


def _timed(call: Callable[[], Any], loop: _EventLoop) -> tuple[Any, str | None, float]:
    """(value, None, seconds) of `call()` (awaited on `loop` when it returns an awaitable), or (None,
    "env_error: ...", seconds) when it raises anything at all (`SystemExit` and a cancelled coroutine included)."""
    t0 = time.perf_counter()
    try:
        value = call()
        if inspect.isawaitable(value):
            value = loop.wait(value)
        return value, None, time.perf_counter() - t0
    except BaseException as e:  # an environment's failure ends its episode, never the generator
        return None, f"env_error: {type(e).__name__}: {e}", time.perf_counter() - t0


async def _awaited(awaitable):
    return await awaitable
