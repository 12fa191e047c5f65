"""Start and stop child processes so that none outlives its parent.

Each child runs in its own process group (so its own children, e.g. vLLM engine cores, are
stopped with it) and gets SIGTERM from the kernel if the parent dies first (PR_SET_PDEATHSIG).
`stop_child` waits for a polite exit, then SIGTERMs and SIGKILLs whatever is left of the group,
the session and the descendants, also when the leader itself is already dead.
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
    """Stop `proc` and everything it started: wait `grace_s` for a clean exit (after the caller
    asked it to stop), then SIGTERM, then SIGKILL the rest. Returns the exit code. Idempotent.

    "Everything it started" is its process group and session (`start_child` makes it the leader of
    both) plus its descendants at the time of the call: a dead leader's children (vLLM's engine core,
    the resource tracker) live on with parent pid 1, and only their group and session still name
    them. The leader stays unreaped until they are gone, so its pid (their group id) is not reused.
    """
    family = set(descendants(proc.pid)) if proc.returncode is None else set()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if not _signal_all(proc, family, sig):
            break
        if _wait_gone(proc, family, wait_s):
            break
    return proc.wait()


def _members(pid: int, family: set[int]) -> list[int]:
    """Living processes: `pid` itself, its group or session, and `family` (zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry / "stat")
        if fields is None or fields[0] == "Z":
            continue
        # fields after the command name: state ppid pgrp session ...
        if int(entry.name) == pid or int(entry.name) in family or int(fields[2]) == pid or int(fields[3]) == pid:
            out.append(int(entry.name))
    return out


def _signal_all(proc: subprocess.Popen, family: set[int], sig: int) -> bool:
    """Send `sig` to every member; False when none is left."""
    members = _members(proc.pid, family)
    for pid in members:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return bool(members)


def _wait_gone(proc: subprocess.Popen, family: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reaps the leader once it exits (its zombie is not counted)
        if not _members(proc.pid, family):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _stat_fields(path: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """PIDs of all living descendants of `pid` (Linux /proc), for checks that nothing is left. A zombie (exited,
    not yet reaped by its parent: vLLM's engine core after its shutdown, until multiprocessing reaps it) is not
    living and runs nothing: it is left out."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry / "stat")
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out
