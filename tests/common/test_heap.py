"""`common/heap.py`: the collector paused while a run process starts, garbage of the start collected once at
`settle`, survivors frozen; nothing changes where the collector runs. Each case runs in a fresh interpreter (a
frozen heap is the process's for good)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PAUSED = """
import gc, weakref
from rlhf_engine.common.heap import pause_collection, set_aside, settle

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

pause_collection()
early = cycle()          # garbage of the start, set aside below
kept = [Node() for _ in range(1000)]
set_aside()
assert gc.get_freeze_count() > 0 and not gc.isenabled()
late = cycle()           # garbage after set_aside
gc.collect()             # a collection the start asks for itself skips what was set aside
assert early() is not None and late() is None
settle()
assert early() is None   # settle collected the set-aside garbage too
assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
print("ok")
"""

RUNNING = """
import gc
from rlhf_engine.common.heap import set_aside, settle

set_aside()
settle()
assert gc.isenabled() and gc.get_freeze_count() == 0  # an embedding program's collector is left alone
print("ok")
"""


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_paused_start_collects_its_garbage_once_and_freezes_the_rest():
    assert run(PAUSED) == "ok"


def test_where_the_collector_runs_nothing_changes():
    assert run(RUNNING) == "ok"
