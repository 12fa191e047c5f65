"""Helpers for multi-rank tests: run a worker script as N gloo ranks under torchrun, and always reap it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_engine.data import synthetic
from rlhf_engine.models.tiny import make_tiny_model_dir
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture; each torchrun rank has 1 thread too)

WORKERS = Path(__file__).parent / "workers"


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N workers/<script> args...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", str(WORKERS / script), *args]


def run_group(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout (or any error here) kill the whole group, so no rank
    outlives the test. Returns the finished process (stdout and stderr merged)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=full_env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        print(out[-6000:])
        raise
    finally:
        _kill_group_leftovers(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _kill_group_leftovers(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def torchrun(tmp_path):
    """torchrun(nproc, script, *args, timeout=120) -> stdout; fails the test with the ranks' output unless rc 0."""

    def run(nproc: int, script: str, *args: str, timeout: float = 150.0, expect_rc: int | None = 0) -> str:
        proc = run_group(torchrun_cmd(nproc, script, *args), timeout)
        if expect_rc is not None and proc.returncode != expect_rc:
            pytest.fail(f"{script} on {nproc} ranks exited {proc.returncode}:\n{proc.stdout[-8000:]}")
        return proc.stdout

    return run


def read_dcp_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint folder `path`, full size, by flat key (`model.policy.<param>`,
    `optim.state.policy.<param>.exp_avg`, ...), read in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    dcp.load(tensors, checkpoint_id=str(path), no_dist=True)
    return tensors


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """(tiny policy folder, 64 synthetic prompts as JSONL) for engine runs on ranks."""
    root = tmp_path_factory.mktemp("engine_ranks")
    policy = make_tiny_model_dir(root / "policy")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(64, seed=0)))
    return policy, prompts


STRAIGHT_STEPS = 3


@pytest.fixture(scope="session")
def straight(tmp_path_factory, files) -> tuple[Path, list[list[str]]]:
    """An uninterrupted plain single-process run (no torchrun; sync, one generator, the fault tests' reward without
    a fault) of STRAIGHT_STEPS steps with a checkpoint after each: its run folder and each step's sorted prompts
    (`tests.helpers.faults.steps`). Runs on 2 ranks that resume, restart or lose a generator end where it does
    (a plain run and a run on ranks train the same: `test_engine_ranks.py`, `test_ppo_ranks.py`)."""
    from tests.distributed.engine_runs import ppo_cmd, write_config
    from tests.helpers import faults

    root = tmp_path_factory.mktemp("straight")
    config = write_config(root, files, reward_fn="tests.helpers.faults:scores", mode="sync", num_generators=1,
                          save_steps=1, keep_last=STRAIGHT_STEPS, total_steps=STRAIGHT_STEPS)
    (root / "log").mkdir()
    proc = run_group(ppo_cmd(config), timeout=180,
                     env={"FAULT_LOG": str(root / "log"), "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stdout[-6000:]
    steps = faults.steps(root / "log")
    assert len(steps) == STRAIGHT_STEPS and all(len(s) == 8 for s in steps)
    return root / "run", steps
