"""The engine with 2 trainer ranks (`rlhf-engine ppo --nproc 2`) and 2 generator processes: a run completes
with sharded checkpoints, resumes at another world size, a killed rank stops the whole job, bad input is
refused before anything starts. Every process the run starts carries a marker in its environment, so the
tests can check that none is left, orphans included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from rlhf_engine.data import synthetic
from rlhf_engine.models.tiny import make_tiny_model_dir
from tests.distributed.conftest import run_group

MARK = "RLHF_ENGINE_TEST_MARK"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_ranks")
    policy = make_tiny_model_dir(root / "policy")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(64, seed=0)))
    return policy, prompts


def write_config(tmp_path: Path, files, **engine) -> Path:
    policy, prompts = files
    config = {
        "model": {"policy": str(policy), "reward_fn": "rlhf_engine.demo:gold_scores"},
        "data": {"prompts": str(prompts), "max_prompt_length": 16},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
                "response_length": 8, "seed": 0},
        "generator": {"backend": "transformers", "max_model_len": 64},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 20.0},
        "engine": {"run_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False, "mode": "async",
                   "num_generators": 2, **engine},
        "trainer": {"backend": "gloo", "timeout_s": 60.0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ppo_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_engine", "ppo", "--config", str(config), *args]


def marked_processes(mark: str) -> list[int]:
    """PIDs of living processes whose environment holds MARK=mark."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_none_left(mark: str, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marked_processes(mark), f"processes left behind: {marked_processes(mark)}"


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_two_ranks_two_generators_complete_with_sharded_checkpoints(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=2, save_steps=1)
    mark = uuid.uuid4().hex
    proc = run_group(ppo_cmd(config, "--nproc", "2"), timeout=240, env={MARK: mark})
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "ppo: 2 steps" in proc.stdout
    run = tmp_path / "run"
    assert metric_steps(run) == [1, 2]
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
        assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    assert_none_left(mark)


@pytest.mark.slow
def test_engine_resumes_two_rank_checkpoint_on_one_rank(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=1, save_steps=1)
    assert run_group(ppo_cmd(config, "--nproc", "2"), timeout=240).returncode == 0
    proc = run_group(ppo_cmd(config, "--nproc", "1", "--resume", str(tmp_path / "run"),
                             "--set", "engine.total_steps=2"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert metric_steps(tmp_path / "run") == [1, 2]
    assert len(list((tmp_path / "run" / "checkpoints" / "step-00000002" / "dcp").glob("*.distcp"))) == 1


@pytest.mark.slow
def test_killed_rank_stops_the_whole_job(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=200)
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(ppo_cmd(config, "--nproc", "2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, MARK: mark})
    try:
        deadline = time.monotonic() + 180
        while not metric_steps(tmp_path / "run") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-6000:]
            time.sleep(0.5)
        rank1 = [pid for pid in marked_processes(mark) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes()
                 .split(b"\0") and b"rlhf_engine" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # well within the heartbeat timeout of the generators (20 s) + exit
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0
    assert "exitcode  : -9" in out and "rank      : 1" in out  # torchrun names the dead rank
    assert_none_left(mark)
    assert len(metric_steps(tmp_path / "run")) < 200


def test_bad_input_is_refused_before_anything_starts(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=1)
    mark = uuid.uuid4().hex
    cases = [
        (["--nproc", "3"], r"mini_batch_size (4) must be divisible by the number of trainer ranks (3)"),
        (["--nproc", "16"], "16 trainer ranks (--nproc / WORLD_SIZE) exceed ppo.batch_size (8)"),
        (["--nproc", "2", "--set", "trainer.mixed_precision=bf16"], "trainer.mixed_precision='bf16' needs CUDA"),
    ]
    for args, message in cases:
        proc = run_group(ppo_cmd(config, *args), timeout=120, env={MARK: mark})
        assert proc.returncode != 0 and message in proc.stdout, (args, proc.stdout[-4000:])
    # one rank's torchrun variables without the others
    proc = run_group(ppo_cmd(config), timeout=60, env={MARK: mark, "RANK": "0", "WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "rendezvous variables missing: LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in proc.stdout
    assert_none_left(mark)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
