"""Runs of the engine on trainer ranks, as a user starts them (`rlhf-engine ppo --nproc N` in a subprocess), and
what the tests read back: the run's config, processes left behind, metrics, checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import load_state
from tests.distributed.conftest import read_dcp_tensors
from tests.helpers.waiting import wait_until

MARK = "RLHF_ENGINE_TEST_MARK"
"""Every process a test run starts carries MARK=<a fresh id> in its environment, so that the test can find any
left behind, orphans included."""


def write_config(tmp_path: Path, files, *, reward_fn: str = "rlhf_engine.demo:gold_scores",
                 trainer_timeout_s: float = 60.0, **engine) -> Path:
    """A run of the tiny model on 64 synthetic prompts (2 async generators unless `engine` says otherwise),
    written to `tmp_path/run.yaml`; the run folder is `tmp_path/run`."""
    policy, prompts = files
    config = {
        "model": {"policy": str(policy), "reward_fn": reward_fn},
        "data": {"prompts": str(prompts), "max_prompt_length": 16},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
                "response_length": 8, "seed": 0},
        "generator": {"backend": "transformers", "max_model_len": 64},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 20.0},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl"], "progress": False, "mode": "async",
                   "num_generators": 2, **engine},
        "trainer": {"backend": "gloo", "timeout_s": trainer_timeout_s},
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
    wait_until(lambda: not marked_processes(mark), wait_s, interval_s=0.2,
               message=lambda: f"no process left behind ({marked_processes(mark)})")


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def metrics(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def policy_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": t for name in ("policy/model.safetensors", "value_head.safetensors")
            for key, t in load_file(str(ckpt / name)).items()}


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
