"""`rlhf-engine ppo --nproc N`: re-run the same command as N ranks under `torch.distributed.run` (torchrun).

The child command is `python -m torch.distributed.run --standalone --nproc_per_node N -m rlhf_engine <args>`
with `--nproc` removed, so each rank sees torchrun's rendezvous variables and takes the multi-rank path.
torchrun stops every rank when one fails; this process forwards SIGINT/SIGTERM to torchrun's process group
and waits for it, so nothing outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """The single-host torchrun command that runs `rlhf_engine <cli_args>` as `nproc` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", "-m", "rlhf_engine", *strip_nproc(cli_args)]


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run `cli_args` as `nproc` ranks on this host and return torchrun's exit code."""
    proc = subprocess.Popen(torchrun_command(nproc, cli_args), start_new_session=True)

    def forward(signum, frame) -> None:
        os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
