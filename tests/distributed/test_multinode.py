"""Multi-node launch, simulated on this host: two torchrun agents (`--nnodes 2`, one rank each, c10d
rendezvous over loopback), as a user starts them on two trainer nodes, with 2 async generators. The run completes
on both with a sharded checkpoint at every step; rank 0 (node 0) owns the generators and the run's files; nothing is
left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

from tests.distributed.engine_runs import MARK, assert_none_left, metric_steps, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_complete_a_run(tmp_path, files):
    config = write_config(tmp_path, files, total_steps=2, save_steps=1)
    mark = uuid.uuid4().hex
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", mark,
                               "-m", "rlhf_engine", "ppo", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**os.environ, MARK: mark})
             for node in (0, 1)]
    try:
        outs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:  # each agent leads its own process group: its ranks and generators go with it
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert "ppo: 2 steps" in outs[0] + outs[1]
    assert "connected from" in outs[0] and "connected from" not in outs[1]  # the generators talk to rank 0 only
    assert metric_steps(tmp_path / "run") == [1, 2]
    for step in (1, 2):
        ckpt = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
        assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
        assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    assert_none_left(mark)
