"""Faults during a run: generators killed, forged rollouts, rogue peers. The run goes on, trains
each step's prompts exactly as an undisturbed run with the same seed does, and leaves nothing behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _runs import run_config

from rlhf_engine.common.procs import descendants, start_child, stop_child
from rlhf_engine.engine.core import Callback, RLHFEngine
from tests.helpers.generators import generator_pids
from tests.helpers.waiting import wait_until

STEPS = 20
FLOOD_STEPS = 10
"""Steps of the flood run: the flood starts after step 1 and goes on to the end; every kind of forged rollout
is dropped many times within a few steps (each kind is sent ~50 times a second)."""
ROGUE = str(Path(__file__).with_name("_rogue.py"))


class PromptLog(Callback):
    """The sorted prompt token lists each step trained on (a prompt appears num_generations times)."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, ...]]] = []
        self._current: list[tuple[int, ...]] = []

    def on_rollout(self, rollout) -> None:
        self._current.append(tuple(rollout.prompt_ids.tolist()))

    def on_step(self, step, stats) -> None:
        self.steps.append(sorted(self._current))
        self._current = []


def chaos_config(tmp_path, policy_dir, prompts_file, **engine):
    (tmp_path / "shm").mkdir(parents=True, exist_ok=True)
    return run_config(tmp_path, policy_dir, prompts_file, backend="transformers", total_steps=STEPS, mode="async",
                      max_staleness=1, reissue_timeout_s=20.0, **engine,
                      # a killed generator leaves the roster (and frees its weight buffers) before its replacement
                      # is up; see the report on the transport's shared-memory holders
                      transport={"shm_dir": str(tmp_path / "shm"), "heartbeat_timeout_s": 5.0})


def run(cfg, on_stats=None) -> tuple[PromptLog, list[dict]]:
    log = PromptLog()
    history = []
    with RLHFEngine(cfg, callbacks=[log]) as engine:
        for stats in engine.steps():
            history.append(stats)
            if on_stats is not None:
                on_stats(engine, stats)
    return log, history


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, policy_dir, prompts_file):
    """What an undisturbed run with the same seed trains, step by step."""
    log, history = run(chaos_config(tmp_path_factory.mktemp("undisturbed"), policy_dir, prompts_file))
    assert len(log.steps) == STEPS and all(len(s) == 8 for s in log.steps)
    assert history[-1]["faults/generator_restarts"] == 0
    return log.steps


def start_rogue(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, ROGUE, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = proc.stdout.readline()
    assert line.startswith("ready"), f"rogue {args[0]} did not start: {line!r}"
    return proc


def assert_nothing_left(tmp_path, assert_no_new_children):
    assert_no_new_children()
    assert os.listdir(tmp_path / "shm") == [], "shared-memory or staging files left behind"


def live_generator_pids() -> list[int]:
    """The local generator processes that are alive (a killed one stays a zombie until the engine reaps it)."""
    return [pid for pid in generator_pids() if _alive(pid)]


def test_generator_killed_three_times(tmp_path, policy_dir, prompts_file, undisturbed, assert_no_new_children):
    rng = random.Random(14)
    pending = sorted(rng.sample(range(2, STEPS - 8), 3))  # steps after which a kill is due
    killed, anomalies, threads, scheduled = [], [], [], []

    def kill_later(delay: float) -> None:
        time.sleep(delay)
        pids = live_generator_pids()
        if len(pids) != 1:
            anomalies.append(f"{len(pids)} live generators when a kill was due: {pids}")
            return
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    def on_stats(engine, stats):
        for thread in threads:  # the last kill has landed (during the step that just ended, or now)
            thread.join()
        # a kill is due and every earlier one was handled: the replacement completed its handshake (the engine
        # waits for it before it goes on), so exactly one generator is alive; it dies at a random moment of
        # the next step. A kill due while an earlier one is still unhandled waits for a later step.
        if pending and engine.step >= pending[0] and stats["faults/generator_restarts"] == len(killed):
            pending.pop(0)
            scheduled.append(engine.step)
            threads.append(threading.Thread(target=kill_later, args=(rng.uniform(0.0, 0.5),)))
            threads[-1].start()

    cfg = chaos_config(tmp_path, policy_dir, prompts_file, max_generator_restarts=3)
    log, history = run(cfg, on_stats)
    assert not anomalies and not pending, (anomalies, pending)
    assert len(set(killed)) == 3
    assert log.steps == undisturbed
    last = history[-1]
    assert last["faults/generator_restarts"] == 3
    assert last["faults/reissued_prompts"] >= 1
    assert all(h["off_policy/staleness_max"] <= 1 for h in history)
    print(f"\nkills after steps {scheduled}: restarts "
          f"{last['faults/generator_restarts']:.0f}, re-issued prompts {last['faults/reissued_prompts']:.0f}, "
          f"late rollouts {last['faults/late_rollouts']:.0f}")
    assert_nothing_left(tmp_path, assert_no_new_children)


def test_forged_rollout_flood(tmp_path, policy_dir, prompts_file, undisturbed, assert_no_new_children):
    cfg = chaos_config(tmp_path, policy_dir, prompts_file)
    cfg.engine.total_steps = FLOOD_STEPS
    # the rogue also swallows prompt batches (it never samples): each waits this long before it goes out again
    cfg.engine.reissue_timeout_s = 2.0
    rogues = []

    def on_stats(engine, stats):
        if engine.step == 1:  # from here on to the end
            rogues.append(start_rogue("flood", engine.endpoint, str(policy_dir), str(tmp_path / "shm")))

    try:
        log, history = run(cfg, on_stats)
    finally:
        for rogue in rogues:
            stop_child(rogue, grace_s=0)
    assert log.steps == undisturbed[:FLOOD_STEPS]
    drops = {k.removeprefix("wire/dropped/"): v for k, v in history[-1].items() if k.startswith("wire/dropped/")}
    print(f"\ndropped: {drops}; re-issued prompts {history[-1]['faults/reissued_prompts']:.0f}")
    for reason in ("token_out_of_range", "unknown_prompt", "bad_logprob", "future_version", "already_trained"):
        assert drops.get(reason, 0) > 0, (reason, drops)
    assert sum(v for k, v in drops.items() if "large" in k or "too_long" in k) > 0, drops
    assert drops.get("duplicate", 0) > 0, drops
    assert_nothing_left(tmp_path, assert_no_new_children)


def test_restart_budget_spent_stops_with_a_checkpoint(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    from rlhf_engine.common.checkpoint import latest_checkpoint, load_state
    from rlhf_engine.engine.generators import RestartBudgetExceeded

    cfg = chaos_config(tmp_path, policy_dir, prompts_file, max_generator_restarts=0)
    cfg.engine.total_steps = 5

    done = []

    def on_stats(engine, stats):
        done.append(engine.step)
        if engine.step == 2:
            os.kill(generator_pids()[0], signal.SIGKILL)

    with pytest.raises(RestartBudgetExceeded, match=r"(?s)max_generator_restarts=0.*generator-0 exited with code -9"):
        run(cfg, on_stats)
    # the run stopped after the steps it completed (2, or 3 when the next batch was already in), resumable
    assert done[-1] in (2, 3) and load_state(latest_checkpoint(tmp_path / "run"))["step"] == done[-1]
    assert_nothing_left(tmp_path, assert_no_new_children)


def start_external_generator(config_path: Path, endpoint: str, name: str, log_path: Path) -> subprocess.Popen:
    """`rlhf-engine generator --connect ENDPOINT` as another host would run it (dies with the test process)."""
    return start_child(["-m", "rlhf_engine.cli", "generator", "--config", str(config_path), "--name", name,
                        "--connect", endpoint], log_path=log_path)


def wait_for_line(path: Path, text: str, timeout_s: float = 120.0) -> None:
    wait_until(lambda: path.is_file() and text in path.read_text(), timeout_s, interval_s=0.1,
               message=f"{text!r} in {path}")


def test_a_joining_external_generator_samples_at_once_and_none_left_stops_the_run(
        tmp_path, policy_dir, prompts_file, assert_no_new_children):
    """An external-generator-only run: a second generator joins after version 2 was published and the first is
    killed. The newcomer gets version 2 at its handshake: without it, it would wait for a publish that needs its
    own rollouts, until rollout_timeout_s. Then it is killed too, and the run stops after
    no_generator_timeout_s with a checkpoint of the step it reached."""
    from rlhf_engine.common.checkpoint import latest_checkpoint, load_state
    from rlhf_engine.engine.config import save_run_config
    from rlhf_engine.engine.supervisor import NoGeneratorLeft

    cfg = chaos_config(tmp_path, policy_dir, prompts_file, num_generators=0, external_generators=1,
                       no_generator_timeout_s=3.0, rollout_timeout_s=300.0)
    cfg.engine.total_steps = 12
    cfg.engine.reissue_timeout_s = 5.0  # what the killed generator's socket held goes out again soon
    cfg.transport.heartbeat_timeout_s = 2.0
    config_path = tmp_path / "run.yaml"
    save_run_config(cfg, config_path)
    endpoint = cfg.transport.endpoint
    logs = [tmp_path / "ext-a.log", tmp_path / "ext-b.log"]
    gens = [start_external_generator(config_path, endpoint, "ext-a", logs[0])]
    done, times = [], {}

    def on_stats(engine, stats):
        done.append(engine.step)
        if engine.step == 2:
            gens.append(start_external_generator(config_path, endpoint, "ext-b", logs[1]))
            wait_for_line(logs[1], "connected to")
            t0 = time.monotonic()
            wait_for_line(logs[1], "applied weights v2", 30.0)  # this thread holds the trainer: no publish since
            times["weights_after_join"] = time.monotonic() - t0
            os.kill(gens[0].pid, signal.SIGKILL)  # from now on ext-b alone
            times["alone"] = time.monotonic()
        elif engine.step == 3:
            times["step_after"] = time.monotonic()
        elif engine.step == 5:
            os.kill(gens[1].pid, signal.SIGKILL)
            times["none_left"] = time.monotonic()

    try:
        with pytest.raises(NoGeneratorLeft, match=r"no generator left for 3 s \(engine.no_generator_timeout_s\); "
                                                  r"a checkpoint of the current step was written: resume with --resume"):
            run(cfg, on_stats)
        stopped_after = time.monotonic() - times["none_left"]
    finally:
        for gen in gens:
            stop_child(gen, grace_s=0)
    assert done[:5] == [1, 2, 3, 4, 5] and done[-1] in (5, 6)  # 6: its batch was in before the kill
    assert load_state(latest_checkpoint(tmp_path / "run"))["step"] == done[-1]  # resumable where it stopped
    assert "applied weights v1" not in logs[1].read_text()  # the newest at once, not the older ones
    print(f"\njoining generator: weights v2 applied {times['weights_after_join']:.2f} s after its handshake was "
          f"seen, next step done {times['step_after'] - times['alone']:.1f} s after it was alone; run stopped "
          f"{stopped_after:.1f} s after the last generator died (heartbeat_timeout_s 2 + no_generator_timeout_s 3)")
    assert_nothing_left(tmp_path, assert_no_new_children)


def test_rogue_hello_and_rogue_pull_do_not_stop_the_run(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="transformers", total_steps=6, mode="async",
                     reissue_timeout_s=2.0, transport={"shm_dir": str(tmp_path / "shm"), "heartbeat_timeout_s": 2.0})
    (tmp_path / "shm").mkdir()
    rogues = []

    def on_stats(engine, stats):
        if engine.step == 1:
            rogues.append(start_rogue("hello", engine.endpoint, str(policy_dir), str(tmp_path / "shm")))
            rogues.append(start_rogue("pull", engine.endpoint))

    try:
        log, history = run(cfg, on_stats)
    finally:
        for rogue in rogues:
            os.kill(rogue.pid, signal.SIGCONT)
            stop_child(rogue, grace_s=0)
    assert len(history) == 6
    last = history[-1]
    print(f"\nrogue HELLO + rogue PULL: re-issued prompts {last['faults/reissued_prompts']:.0f}, "
          f"late {last['faults/late_rollouts']:.0f}")
    assert last["faults/reissued_prompts"] > 0  # the batches the rogue PULL swallowed went out again
    assert_nothing_left(tmp_path, assert_no_new_children)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("engine_process", [True, False], ids=["vllm_processes", "vllm_in_process"])
def test_vllm_generator_killed_is_replaced_and_its_tree_ends(tmp_path, policy_dir, prompts_file, assert_no_new_children,
                                                             engine_process):
    pytest.importorskip("vllm")
    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="vllm", total_steps=6, mode="async",
                     transport={"shm_dir": str(tmp_path / "shm")}, generator={"engine_process": engine_process})
    (tmp_path / "shm").mkdir()
    trees = []

    def on_stats(engine, stats):
        if engine.step in (2, 4):
            leader = generator_pids()[0]
            trees.append([leader, *descendants(leader)])  # vLLM's engine core, worker, resource tracker
            os.kill(leader, signal.SIGKILL)  # the leader alone: its children now have parent pid 1

    log, history = run(cfg, on_stats)
    assert len(history) == 6 and history[-1]["faults/generator_restarts"] == 2
    if engine_process:  # vLLM's engine core and worker are the leader's descendants
        assert all(len(tree) > 1 for tree in trees), trees
    assert not [p for tree in trees for p in tree if _alive(p)], "processes of a killed generator survived"
    assert_nothing_left(tmp_path, assert_no_new_children)
