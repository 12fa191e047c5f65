"""A timeline of busy intervals per process (`run_dir/timeline.jsonl`), for the idle-fraction numbers and
the Gantt plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rlhf_engine.telemetry.files import TIMELINE_FILE


@dataclass(frozen=True)
class Interval:
    """One busy interval of one process (wall-clock seconds since the epoch)."""

    proc: str
    phase: str
    start: float
    end: float


class Timeline:
    """Appends busy intervals to `run_dir/timeline.jsonl`."""

    def __init__(self, run_dir: str | Path) -> None:
        self._file = open(Path(run_dir) / TIMELINE_FILE, "a", encoding="utf-8")

    def add(self, proc: str, phase: str, start: float, end: float) -> None:
        self._file.write(json.dumps({"proc": proc, "phase": phase, "start": start, "end": end}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def idle_fractions(intervals: Iterable[Interval | dict], start: float, end: float) -> dict[str, float]:
    """Fraction of [start, end] that each process spent outside its busy intervals.

    Overlapping intervals of one process are merged before summing.
    """
    by_proc: dict[str, list[tuple[float, float]]] = {}
    for iv in intervals:
        d = iv if isinstance(iv, dict) else iv.__dict__
        s, e = max(d["start"], start), min(d["end"], end)
        if e > s:
            by_proc.setdefault(d["proc"], []).append((s, e))
    span = max(end - start, 1e-12)
    out = {}
    for proc, spans in by_proc.items():
        spans.sort()
        busy, cur_s, cur_e = 0.0, *spans[0]
        for s, e in spans[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
        out[proc] = 1.0 - busy / span
    return out
