"""The generator processes a test's engine started."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_engine.common.procs import descendants


def generator_pids() -> list[int]:
    """Pids of this process's descendants that run `rlhf-engine generator --name ...`."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"generator" in cmd and b"--name" in cmd:
            out.append(pid)
    return out
