"""Faults of a run on 2 trainer ranks (`rlhf-engine ppo --nproc 2`), as a user meets them: a generator killed (it
is replaced from the newest weights and the run completes), an exception on rank 1 and a SIGKILLed rank 1 (every rank
ends within seconds, not at the collective timeout, nothing is left running, and `--resume` continues exactly),
and torchrun restarting the ranks by itself after an exception on rank 0 (`engine.trainer_restarts`). "Exactly" is
against one uninterrupted run (a plain one, conftest's `straight`): the same prompts at every step, and the same
weights, Adam moments, scheduler, KL controller and data position at the end (sync mode, fp32 tiny model).
Each test prints the time from the fault to the run's exit or recovery."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.distributed.conftest import STRAIGHT_STEPS, run_group
from tests.distributed.engine_runs import (
    MARK,
    assert_none_left,
    assert_same_checkpoint,
    marked_processes,
    metric_steps,
    metrics,
    ppo_cmd,
    write_config,
)
from tests.helpers import faults
from tests.helpers.waiting import wait_until

REPO = str(Path(__file__).resolve().parents[2])
FAULTY = "tests.helpers.faults:scores"
STEPS = STRAIGHT_STEPS
RUN = dict(mode="sync", num_generators=1, save_steps=1, keep_last=STEPS, total_steps=STEPS)
COLLECTIVE_TIMEOUT_S = 600.0
"""`trainer.timeout_s` of these runs: a rank left waiting in a collective would hold the run this long, far past
each test's own deadline."""


def run_env(log: Path, mark: str, **fault: int) -> dict[str, str]:
    log.mkdir(parents=True, exist_ok=True)
    return {MARK: mark, "FAULT_LOG": str(log), "PYTHONPATH": REPO, **{k: str(v) for k, v in fault.items()}}


def config_for(tmp_path: Path, files, **engine) -> Path:
    return write_config(tmp_path, files, reward_fn=FAULTY, trainer_timeout_s=COLLECTIVE_TIMEOUT_S, **{**RUN, **engine})


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def our_shm_files(mark_pids: list[int]) -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if any(f"-{pid}." in p.name for pid in mark_pids)]


def run_pids(mark: str) -> list[int]:
    """The ranks and generators of a run (their shared-memory files carry their pids)."""
    return [pid for pid in marked_processes(mark) if b"rlhf_engine" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **env})


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        print(proc.communicate()[0][-6000:])
        raise


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180.0, checkpoint: bool = False) -> None:
    """Until the run logged `step` (and wrote its checkpoint, with `checkpoint`)."""
    def reached() -> bool:
        done = step in metric_steps(run) and (not checkpoint or ckpt(run, step).is_dir())
        assert done or proc.poll() is None, f"the run ended (exit {proc.poll()})"
        return done

    try:
        wait_until(reached, timeout, interval_s=0.1, message=f"step {step}")
    except AssertionError as e:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{e}:\n{proc.communicate()[0][-6000:]}") from None


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_generator_killed_under_two_ranks_is_replaced_from_the_newest_weights(tmp_path, files, straight, mode):
    """SIGKILL of the only generator after the first weight update: the replacement starts from the weights every
    rank gathered, and the run completes with each step's prompts as the uninterrupted run's."""
    mark = uuid.uuid4().hex
    proc = start(ppo_cmd(config_for(tmp_path, files, mode=mode), "--nproc", "2"), run_env(tmp_path / "log", mark))
    run = tmp_path / "run"
    wait_for_step(proc, run, 1)
    generators = [pid for pid in marked_processes(mark) if b"--name" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(generators) == 1, generators
    pids = run_pids(mark)
    os.kill(generators[0], signal.SIGKILL)
    out = finish(proc, timeout=240)
    assert proc.returncode == 0, out[-6000:]
    replaced = re.search(r"generator-0\.1 replaced in ([\d.]+) s \(weights v(\d+)\)", out)
    assert replaced and int(replaced[2]) >= 1, out[-6000:]
    assert metric_steps(run) == [1, 2, 3]
    assert metrics(run)[STEPS]["faults/generator_restarts"] == 1
    assert faults.steps(tmp_path / "log") == straight[1]
    print(f"\n{mode}: generator SIGKILLed after step 1 -> replaced in {float(replaced[1]):.1f} s "
          f"(weights v{replaced[2]}); run completed")
    assert_none_left(mark)
    assert not our_shm_files(pids)


def assert_named_failure(out: str, rank: int) -> None:
    """The run's output names the injected exception and the rank it was raised on (ours and torchrun's)."""
    cause = f"RuntimeError: injected fault on rank {rank} at call 3"
    if rank == 1:
        assert f"rlhf-engine ppo: trainer rank 1 failed: {cause}" in out, out[-6000:]
    else:
        assert f"trainer rank 1 stopped: trainer rank 0 failed: {cause}" in out, out[-6000:]
    assert re.search(rf"Root Cause \(first observed failure\):\n\[0\]:\n.*\n.*\n\s+rank\s+: {rank} ", out), out[-3000:]


def test_an_exception_on_one_rank_ends_every_rank_and_names_the_checkpoint_to_resume(tmp_path, files):
    """The reward function raises on rank 1 in step 3: every rank ends within seconds, the error and the failing
    rank are named with the `--resume` that continues, nothing is left, the step-2 checkpoint is whole. (An exception
    on rank 0, in the middle of the step's collectives, and the exact continuation from the newest checkpoint:
    `test_trainer_restarts_...`; a checkpoint of 2 ranks continued on one process or on 2: test_engine_ranks.py's
    `test_plain_run_resumes_on_two_ranks_and_back`.)"""
    mark = uuid.uuid4().hex
    config = config_for(tmp_path, files)
    run, log = tmp_path / "run", tmp_path / "log"
    pids: list[int] = []
    proc = start(ppo_cmd(config, "--nproc", "2"), run_env(log, mark, FAULT_RANK=1, FAULT_CALL=3))
    wait_for_step(proc, run, 1)
    pids = run_pids(mark)
    out = finish(proc, timeout=240)
    ended = time.time()
    seconds = ended - float((log / "fault-time").read_text())
    assert proc.returncode != 0
    assert_named_failure(out, rank=1)
    assert (f"failed: RuntimeError: injected fault on rank 1 at call 3; continue with --resume {run} "
            "(newest checkpoint: step 2)") in out, out[-6000:]
    print(f"\nexception on rank 1 in step 3 -> every rank ended {seconds:.1f} s later "
          f"(collective timeout {COLLECTIVE_TIMEOUT_S:.0f} s)")
    assert_none_left(mark)
    assert not our_shm_files(pids)
    assert metric_steps(run) == [1, 2] and ckpt(run, 2).is_dir() and not ckpt(run, 3).exists()


@pytest.mark.slow  # torchrun's own handling of a dead rank; the failure channel's cases run by default
def test_a_killed_rank_stops_the_whole_job_and_the_run_resumes_exactly(tmp_path, files, straight):
    """SIGKILL of rank 1 during step 2: torchrun names it, every rank and generator ends, no shared memory is
    left; `--resume` on 2 ranks continues from the newest checkpoint to the uninterrupted run's end."""
    mark = uuid.uuid4().hex
    config = config_for(tmp_path, files)
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(ppo_cmd(config, "--nproc", "2"), run_env(log, mark))
    wait_for_step(proc, run, 1, checkpoint=True)
    ranks = [pid for pid in run_pids(mark) if b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()]
    rank1 = [pid for pid in ranks if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(rank1) == 1, rank1
    pids = run_pids(mark)
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.time()
    out = finish(proc, timeout=120)
    print(f"\nrank 1 SIGKILLed -> every rank ended {time.time() - killed:.1f} s later")
    assert proc.returncode != 0
    assert "exitcode  : -9" in out and "rank      : 1" in out  # torchrun names the dead rank
    assert_none_left(mark)
    assert not our_shm_files(pids)
    done = metric_steps(run)
    assert done and done == list(range(1, len(done) + 1)) and len(done) < STEPS, done

    proc = run_group(ppo_cmd(config, "--nproc", "2", "--resume", str(run)), timeout=240,
                     env=run_env(tmp_path / "log-resumed", mark))
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert metric_steps(run) == [1, 2, 3]
    assert_same_checkpoint(ckpt(straight[0], 3), ckpt(run, 3))
    assert faults.steps(log)[:len(done)] + faults.steps(tmp_path / "log-resumed") == straight[1]
    assert_none_left(mark)


def test_trainer_restarts_bring_a_failed_rank_back_from_the_newest_checkpoint(tmp_path, files, straight):
    """`engine.trainer_restarts: 1`: rank 0 fails in step 3, in the middle of the step's collectives; every rank
    ends, the failure is named, and the job starts again by itself from the step-2 checkpoint and ends exactly
    where the uninterrupted run does."""
    mark = uuid.uuid4().hex
    config = config_for(tmp_path, files, trainer_restarts=1)
    run, log = tmp_path / "run", tmp_path / "log"
    proc = run_group(ppo_cmd(config, "--nproc", "2"), timeout=300, env=run_env(log, mark, FAULT_RANK=0, FAULT_CALL=3))
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert_named_failure(proc.stdout, rank=0)
    assert f"the trainer ranks failed (exit 1); restart 1 of 1 from {ckpt(run, 2)}" in proc.stdout, proc.stdout[-6000:]
    assert metric_steps(run) == [1, 2, 3]
    assert_same_checkpoint(ckpt(straight[0], 3), ckpt(run, 3))
    assert faults.steps(log, job=0)[:2] + faults.steps(log, job=1) == straight[1]
    assert_none_left(mark)
