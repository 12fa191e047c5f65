"""`rlhf-engine ppo --nproc N`: re-run the same command as N ranks under `torch.distributed.run` (torchrun).

The child command is `python -m torch.distributed.run --standalone --nproc_per_node N -m rlhf_engine <args>`
with `--nproc` removed, so each rank sees torchrun's rendezvous variables and takes the multi-rank path.
torchrun stops every rank when one fails; this process forwards SIGINT/SIGTERM to torchrun's process group
and waits for it, so nothing outlives it. With `engine.trainer_restarts` it starts the job again from the newest
checkpoint after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    return without_flag(argv, "--nproc")


def with_resume(cli_args: list[str], run_dir: str) -> list[str]:
    """cli_args continuing the run in `run_dir`: any `--resume X` replaced by `--resume run_dir`."""
    return [*without_flag(cli_args, "--resume"), "--resume", run_dir]


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """The single-host torchrun command that runs `rlhf_engine <cli_args>` as `nproc` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", "-m", "rlhf_engine", *strip_nproc(cli_args)]


def relaunch(nproc: int, cli_args: list[str], *, restarts: int = 0, run_dir: str | None = None) -> int:
    """Run `cli_args` as `nproc` ranks on this host and return torchrun's exit code. After a failure (not an
    interrupt), the whole job starts again from the newest checkpoint in `run_dir`, at most `restarts` times
    (`engine.trainer_restarts`): a fresh torchrun, store and process group each time, never torchrun's own
    in-place restart (with gloo, ranks restarted after a broken connection hung in their process-group
    rendezvous here, torch 2.13)."""
    from rlhf_engine.common.checkpoint import latest_checkpoint

    interrupted = []
    args = list(cli_args)
    for attempt in range(restarts):
        code = _run(torchrun_command(nproc, args), interrupted)
        if code == 0 or interrupted:
            return code
        newest = latest_checkpoint(Path(run_dir)) if run_dir is not None else None
        if newest is None:
            print(f"rlhf-engine ppo: the trainer ranks failed (exit {code}) before any checkpoint; not restarting",
                  file=sys.stderr)
            return code
        print(f"rlhf-engine ppo: the trainer ranks failed (exit {code}); restart {attempt + 1} of {restarts} "
              f"from {newest}", file=sys.stderr, flush=True)
        args = with_resume(cli_args, run_dir)
    return _run(torchrun_command(nproc, args), interrupted)


def _run(command: list[str], interrupted: list[int]) -> int:
    """Run torchrun in its own process group, forwarding SIGINT/SIGTERM to it (noted in `interrupted`)."""
    proc = subprocess.Popen(command, start_new_session=True)

    def forward(signum, frame) -> None:
        interrupted.append(signum)
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
