"""Per-step metrics: `run_dir/metrics.jsonl` (see `rlhf_engine.telemetry.files`), the other sinks of
`engine.loggers` and a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from rlhf_engine.telemetry.files import METRICS_FILE
from rlhf_engine.telemetry.sinks import make_sinks


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends step metrics to `run_dir/metrics.jsonl`, sends the numeric ones to the other `loggers`
    (`tensorboard`, `wandb`: see `rlhf_engine.telemetry.sinks`), and shows a tqdm progress bar with the key numbers.

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
