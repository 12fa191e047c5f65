"""The generator as a process: serves a trainer, stops on request, and leaves nothing behind
when its parent dies (parent-death signal) or the trainer goes silent (heartbeat)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine.common.procs import descendants
from rlhf_engine.transport import PromptBatch, TrainerPort, TransportConfig
from rlhf_engine.transport.weights import dir_fingerprint
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "tests.helpers.processes"]  # run from ROOT


def spec(model_dir: str, endpoint: str, backend: str = "transformers", **generator) -> dict:
    return {
        "generator": {"model": model_dir, "backend": backend, "max_model_len": 256,
                      "sampling": {"n": 2, "max_new_tokens": 8}, **generator},
        "transport": {"endpoint": endpoint, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 3.0,
                      "handshake_timeout_s": 60.0},
    }


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: list[int], timeout_s: float, message: str) -> None:
    """Until none of `pids` is alive (`AssertionError` with `message` and the living ones after `timeout_s`)."""
    wait_until(lambda: not [p for p in pids if alive(p)], timeout_s, interval_s=0.1,
               message=lambda: f"{message}: {[p for p in pids if alive(p)]}")


def test_generator_process_serves_then_stops_on_shutdown(tmp_path, tiny_model_dir):
    s = spec(tiny_model_dir, f"ipc://{tmp_path}/ep")
    with TrainerPort(TransportConfig(**s["transport"]), dir_fingerprint(tiny_model_dir)) as trainer:
        child = subprocess.Popen([sys.executable, *SCRIPT, "generator", json.dumps(s)], stdout=subprocess.PIPE, text=True,
                                 cwd=ROOT)
        try:
            trainer.wait_for_generators(1, timeout_s=120.0)
            trainer.send_prompts(PromptBatch(batch_id=0, prompt_ids=[5, 6], prompts=[[1, 40, 41], [1, 50]]))
            rollouts = []
            while len(rollouts) < 4:
                rollouts += trainer.recv_rollouts(4, timeout_s=30.0)
            trainer.shutdown_generators("test done")
            assert child.wait(timeout=30.0) == 0
            assert child.stdout.read().strip().splitlines()[-1] == "stats 1 4"
        finally:
            child.kill()
    assert sorted(r.prompt_id for r in rollouts) == [5, 5, 6, 6]
    assert all(r.policy_version == 0 and len(r.response_ids) == len(r.behaviour_logp) > 0 for r in rollouts)
    assert len({r.sample_id for r in rollouts}) == 4


def kill_parent_and_check(s: dict, grace_s: float, start_timeout_s: float = 120.0) -> None:
    """Start a stand-in trainer with generator children, SIGKILL it, and require that every
    descendant (generators and whatever they started) exits within `grace_s`."""
    s = {**s, "start_timeout_s": start_timeout_s}
    parent = subprocess.Popen([sys.executable, *SCRIPT, "parent", json.dumps(s)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        line = ""
        for line in parent.stdout:  # engine logs may come first; EOF if the parent failed
            if line.startswith("ready"):
                break
        assert line.startswith("ready"), f"parent ended before its generators were ready; last line {line!r}"
        tree = descendants(parent.pid)
        assert set(map(int, line.split()[1:])) <= set(tree)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_gone(tree, grace_s, "no orphans after the parent died; alive")
    finally:
        parent.kill()


def test_parent_death_leaves_no_generator_behind(tmp_path, tiny_model_dir):
    # one child gets SIGTERM from the kernel (PR_SET_PDEATHSIG); the other only notices that
    # the heartbeats stopped (heartbeat_timeout_s = 3 s)
    s = spec(tiny_model_dir, f"ipc://{tmp_path}/ep")
    s["children"] = ["pdeathsig", "plain"]
    kill_parent_and_check(s, grace_s=20.0)


@pytest.mark.slow
@pytest.mark.vllm
def test_parent_death_stops_vllm_engine_processes(tmp_path, tiny_model_dir):
    pytest.importorskip("vllm")
    s = spec(tiny_model_dir, f"ipc://{tmp_path}/ep", backend="vllm", engine_process=True, kv_cache_bytes=1 << 26)
    s["children"] = ["pdeathsig"]
    kill_parent_and_check(s, grace_s=30.0, start_timeout_s=300.0)
