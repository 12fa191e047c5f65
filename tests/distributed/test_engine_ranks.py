"""The engine with 2 trainer ranks (`rlhf-engine ppo --nproc 2`): a run resumes at another world size (a plain
single-process run's checkpoints too, and back), bad input is refused before anything starts (a run on 2 ranks
with 2 generators and a sharded checkpoint at every step: `test_multinode.py`). Every process the run starts carries a marker in its
environment, so the tests can check that none is left, orphans included. Faults on ranks: `test_rank_faults.py`."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.distributed.conftest import run_group
from tests.distributed.engine_runs import (
    MARK,
    assert_none_left,
    assert_same_checkpoint,
    max_diff,
    metric_steps,
    metrics,
    policy_weights,
    ppo_cmd,
    write_config,
)

PLAIN = dict(mode="sync", num_generators=1, save_steps=1, keep_last=3)


def test_plain_run_resumes_on_two_ranks_and_back(tmp_path, files, straight):
    """A plain single-process run writes the same sharded checkpoints as a run on ranks: its step-1 checkpoint
    continues on 2 ranks, whose step-2 checkpoint continues on one plain process again; each ends where the
    uninterrupted plain run is (conftest's `straight`: sync mode, transformers generator, fp32 tiny model)."""
    straight_run, _ = straight
    a = straight_run / "checkpoints"
    # 1 -> 2: the plain run's step-1 checkpoint on 2 ranks for step 2
    on_two = write_config(tmp_path / "b", files, total_steps=2, **PLAIN)
    proc = run_group(ppo_cmd(on_two, "--nproc", "2", "--resume", str(a / "step-00000001")), timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    b = tmp_path / "b" / "run" / "checkpoints"
    # 2 -> 1: that step-2 checkpoint on one plain process for step 3
    back = write_config(tmp_path / "c", files, total_steps=3, **PLAIN)
    proc = run_group(ppo_cmd(back, "--resume", str(b / "step-00000002")), timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    c = tmp_path / "c" / "run" / "checkpoints"

    assert [len(list((ckpt / "dcp").glob("*.distcp"))) for ckpt in (a / "step-00000001", b / "step-00000002",
                                                                   c / "step-00000003")] == [1, 2, 1]
    assert_same_checkpoint(a / "step-00000002", b / "step-00000002")
    assert_same_checkpoint(a / "step-00000003", c / "step-00000003")
    assert max_diff(policy_weights(a / "step-00000001"), policy_weights(a / "step-00000003")) > 1e-3  # not vacuous
    for run, step in (("b", 2), ("c", 3)):
        assert_same_metrics(straight_run, tmp_path / run / "run", step)


def assert_same_metrics(straight: Path, resumed: Path, step: int) -> None:
    """The resumed run logged from the checkpoint's step on, `step` alone, as the straight run did."""
    want, got = metrics(straight), metrics(resumed)
    assert list(got) == [step]
    for key in ("objective/kl", "ppo/loss/policy", "env/reward_mean", "ppo/learning_rate"):
        assert got[step][key] == pytest.approx(want[step][key], abs=1e-5), key


@pytest.mark.slow
def test_engine_resumes_two_rank_checkpoint_on_one_rank(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=1, save_steps=1)
    assert run_group(ppo_cmd(config, "--nproc", "2"), timeout=240).returncode == 0
    proc = run_group(ppo_cmd(config, "--nproc", "1", "--resume", str(tmp_path / "run"),
                             "--set", "engine.total_steps=2"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert metric_steps(tmp_path / "run") == [1, 2]
    assert len(list((tmp_path / "run" / "checkpoints" / "step-00000002" / "dcp").glob("*.distcp"))) == 1


def test_bad_input_is_refused_before_anything_starts(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=1)
    mark = uuid.uuid4().hex
    cases = [
        (["--nproc", "3"], r"mini_batch_size (4) must be divisible by the number of trainer ranks (3)"),
        (["--nproc", "16"], "16 trainer ranks (--nproc / WORLD_SIZE) exceed ppo.batch_size (8)"),
        (["--nproc", "2", "--set", "trainer.mixed_precision=bf16"], "trainer.mixed_precision='bf16' needs CUDA"),
    ]
    # one rank's torchrun variables without the others
    cases.append(([], "rendezvous variables missing: LOCAL_RANK, MASTER_ADDR, MASTER_PORT"))
    envs = [{MARK: mark}] * 3 + [{MARK: mark, "RANK": "0", "WORLD_SIZE": "2"}]
    # all at once, each in a process group of its own (most of each is Python's imports)
    procs = [subprocess.Popen(ppo_cmd(config, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env={**os.environ, **env})
             for (args, _), env in zip(cases, envs)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    for (args, message), p, out in zip(cases, procs, outs):
        assert p.returncode != 0 and message in out, (args, out[-4000:])
    assert procs[-1].returncode == 2
    assert_none_left(mark)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
