"""The engine with 2 trainer ranks (`rlhf-engine ppo --nproc 2`) and 2 generator processes: a run completes
with sharded checkpoints, resumes at another world size (a plain single-process run's checkpoints too, and
back), a killed rank stops the whole job, bad input is refused before anything starts. Every process the run starts carries a marker in its environment, so the
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
import torch
import yaml
from safetensors.torch import load_file

from rlhf_engine.data import synthetic
from rlhf_engine.models.tiny import make_tiny_model_dir
from rlhf_engine.checkpoint import load_state
from tests.distributed.conftest import read_dcp_tensors, run_group

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
    path.parent.mkdir(parents=True, exist_ok=True)
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


def metrics(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def policy_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": t for name in ("model.safetensors", "value_head.safetensors")
            for key, t in load_file(str(ckpt / "policy" / name)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_checkpoint(want: Path, got: Path, tol: float = 1e-5) -> None:
    """Checkpoints `want` and `got` hold the same training state: policy (HF folder and dcp/), Adam moments and
    step counts, scheduler, KL controller, version, data position, step (floats within `tol`)."""
    assert max_diff(policy_weights(want), policy_weights(got)) <= tol
    dcp_want, dcp_got = read_dcp_tensors(want / "dcp"), read_dcp_tensors(got / "dcp")
    assert sorted(dcp_want) == sorted(dcp_got)
    for key in dcp_want:  # each within 1e-4 of its largest entry (exp_avg_sq is ~1e-9..1e-4; seen: <= 3e-6)
        scale = float(dcp_want[key].abs().max())
        assert float((dcp_got[key] - dcp_want[key]).abs().max()) <= 1e-4 * scale, key
    assert any(key.endswith(".exp_avg_sq") for key in dcp_want)
    s_want, s_got = load_state(want), load_state(got)
    assert (s_got["step"], s_got["prompts"]) == (s_want["step"], s_want["prompts"])
    t_want, t_got = s_want["trainer"], s_got["trainer"]
    assert (t_got["lr_scheduler"], t_got["policy_version"]) == (t_want["lr_scheduler"], t_want["policy_version"])
    assert t_got["kl_ctl"]["value"] == pytest.approx(t_want["kl_ctl"]["value"], abs=tol)
    assert torch.equal(t_got["shuffle_rng"], t_want["shuffle_rng"])


PLAIN = dict(mode="sync", num_generators=1, save_steps=1, keep_last=3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, files) -> Path:
    """An uninterrupted plain single-process run (no torchrun) of 3 steps with a checkpoint after each; its
    run folder."""
    root = tmp_path_factory.mktemp("straight")
    proc = run_group(ppo_cmd(write_config(root, files, total_steps=3, **PLAIN)), timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return root / "run"


def test_plain_run_resumes_on_two_ranks_and_back(tmp_path, files, straight):
    """A plain single-process run writes the same sharded checkpoints as a run on ranks: its step-1 checkpoint
    continues on 2 ranks, whose step-2 checkpoint continues on one plain process again; each ends where the
    uninterrupted plain run is (sync mode, transformers generator, fp32 tiny model)."""
    a = straight / "checkpoints"
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
        assert_same_metrics(straight, tmp_path / run / "run", step)


def assert_same_metrics(straight: Path, resumed: Path, step: int) -> None:
    """The resumed run logged from the checkpoint's step on, `step` alone, as the straight run did."""
    want, got = metrics(straight), metrics(resumed)
    assert list(got) == [step]
    for key in ("objective/kl", "ppo/loss/policy", "env/reward_mean", "ppo/learning_rate"):
        assert got[step][key] == pytest.approx(want[step][key], abs=1e-5), key


def test_older_single_process_checkpoint_resumes_on_one_process_only(tmp_path, files, straight):
    """The layout plain runs wrote before (no dcp/, the optimizer in the state files) still resumes on one
    process and continues the run; on 2 ranks it is refused before the ranks load anything, naming the path and
    what to do, with nothing left running."""
    from rlhf_engine.checkpoint import atomic_directory, write_state
    from rlhf_engine.config import load_run_config
    from rlhf_engine.distributed import Comm
    from rlhf_engine.distributed.dcp import load_trainer
    from rlhf_engine.trainer.ppo_from_config import build_ppo_trainer

    config = write_config(tmp_path, files, total_steps=3, **PLAIN)
    ckpt = straight / "checkpoints" / "step-00000002"
    trainer, _ = build_ppo_trainer(load_run_config(config), ckpt, Comm())
    rest = load_trainer(ckpt, trainer)
    old = tmp_path / "old" / "step-00000002"
    with atomic_directory(old) as tmp:
        trainer.save_pretrained(tmp / "policy")
        write_state(tmp, {**rest, "trainer": trainer.state_dict()})
    mark = uuid.uuid4().hex
    proc = run_group(ppo_cmd(config, "--nproc", "2", "--resume", str(old)), timeout=120, env={MARK: mark})
    assert proc.returncode != 0
    assert (f"rlhf-engine ppo: checkpoint error: {old} is a single-process checkpoint of an older rlhf-engine"
            in proc.stdout), proc.stdout[-4000:]
    assert "cannot resume on 2 trainer ranks: resume it on one process first" in proc.stdout
    assert_none_left(mark)
    proc = run_group(ppo_cmd(config, "--resume", str(old)), timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert max_diff(policy_weights(straight / "checkpoints" / "step-00000003"),
                    policy_weights(tmp_path / "run" / "checkpoints" / "step-00000003")) <= 1e-5
    assert_same_metrics(straight, tmp_path / "run", 3)


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
        ranks = [pid for pid in marked_processes(mark) if b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()
                 and b"rlhf_engine" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # weight segments carry the pid
        os.kill(rank1[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # well within the heartbeat timeout of the generators (20 s) + exit
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0
    assert "exitcode  : -9" in out and "rank      : 1" in out  # torchrun names the dead rank
    assert_none_left(mark)
    assert len(metric_steps(tmp_path / "run")) < 200
    assert not [p for p in Path("/dev/shm").iterdir() if any(f"-{pid}." in p.name for pid in ranks)]


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
