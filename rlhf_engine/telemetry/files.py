"""The files a run records into its folder, and how they are read back.

  metrics.jsonl   one JSON object per step: {"step": k, "time": unix_s, <metric>: value, ...}
  timeline.jsonl  one JSON object per busy interval: {"proc": "trainer"|"generator-0", "phase": str,
                  "start": unix_s, "end": unix_s}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TIMELINE_FILE = "timeline.jsonl"


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
