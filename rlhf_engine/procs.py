"""Start and stop child processes so that none outlives its parent.

Each child runs in its own process group (so its own children, e.g. vLLM engine cores, are
stopped with it) and gets SIGTERM from the kernel if the parent dies first (PR_SET_PDEATHSIG).
`stop_child` asks politely (SIGTERM to the group), waits, then kills the group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def start_child(args: list[str], *, log_path: str | Path | None = None, env: dict[str, str] | None = None,
                cpus: list[int] | None = None) -> subprocess.Popen:
    """Start `python -m ...`-style `args` with the current interpreter in a new process group.

    stdout and stderr go to `log_path` when given (appended), else are inherited. `cpus` pins
    the child (and everything it starts) to those CPU ids.
    """
    out = open(log_path, "ab") if log_path is not None else None
    try:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_child_setup(cpus),
            env={**os.environ, **(env or {})},
        )
    finally:
        if out is not None:
            out.close()


def stop_child(proc: subprocess.Popen, *, grace_s: float = 5.0) -> int:
    """Stop `proc` and its process group: wait `grace_s` for a clean exit (after the caller asked
    it to stop), then SIGTERM the group, then SIGKILL it. Returns the exit code. Idempotent."""
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    _reap_group(proc.pid)
    return proc.wait()


def _reap_group(pgid: int) -> None:
    """SIGKILL whatever is left of process group `pgid` (children that outlived their leader)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """PIDs of all living descendants of `pid` (Linux /proc), for checks that nothing is left."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: ppid is the 2nd field after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out
