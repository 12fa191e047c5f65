"""What a run records: per-step metrics (JSONL, the other sinks of `engine.loggers`, a progress bar)
and a timeline of busy intervals per process, for the idle-fraction numbers and the Gantt plot.

Files in the run directory:
  metrics.jsonl   one JSON object per step: {"step": k, "time": unix_s, <metric>: value, ...}
  timeline.jsonl  one JSON object per busy interval: {"proc": "trainer"|"generator-0", "phase": str,
                  "start": unix_s, "end": unix_s}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlhf_engine.loggers import make_sinks

METRICS_FILE = "metrics.jsonl"
TIMELINE_FILE = "timeline.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends step metrics to `run_dir/metrics.jsonl`, sends the numeric ones to the other `loggers`
    (`tensorboard`, `wandb`: see `rlhf_engine.loggers`), and shows a tqdm progress bar with the key numbers.

    run_config: the run's config as a dict, recorded by loggers that keep it (W&B).
    """

    PROGRESS_KEYS = (("env/reward_mean", "reward"), ("objective/kl", "kl"), ("time/tokens_per_s", "tok/s"))

    def __init__(self, run_dir: str | Path, *, loggers: Sequence[str] = ("jsonl",), total_steps: int | None = None,
                 progress: bool = True, initial_step: int = 0, run_config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # first: a missing package fails here; a run that starts past step 0 resumed from a checkpoint
        self._sinks = make_sinks(loggers, self.run_dir, run_config, resumed=initial_step > 0)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="ppo", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of `step` (one JSON line, flushed; numeric values to every sink)."""
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # 0-d tensors, numpy
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for sink in self._sinks:
            sink.log(step, numeric)
        if self._bar is not None:
            shown = {name: f"{record[k]:.3g}" for k, name in self.PROGRESS_KEYS if isinstance(record.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(0, step - self._bar.n))  # step 0 (the initial evaluation) advances nothing

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._file.closed:
            self._file.close()
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


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


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (missing file: empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_steps_after(run_dir: str | Path, step: int) -> None:
    """Remove the records of steps after `step` from `run_dir/metrics.jsonl` (a resumed run logs them
    again), atomically; lines that are not JSON (a torn last write) go too."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


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
