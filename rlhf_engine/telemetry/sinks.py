"""Where a run's step metrics go besides `metrics.jsonl`: TensorBoard and Weights & Biases.

`engine.loggers` names the sinks; `make_sinks` builds them. Each sink takes every numeric metric
of every step (`log`) and finishes on `close`. The W&B sink also records the run config at the
start and, on close, the timeline (a table) and the run's plots (images), so that a run synced
later (`WANDB_MODE=offline`, then `wandb sync RUN_DIR/wandb/offline-run-*`) holds everything the
run directory holds.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from rlhf_engine.common.config_io import ConfigError

log = logging.getLogger(__name__)

LoggerName = Literal["jsonl", "tensorboard", "wandb"]
LOGGERS: tuple[str, ...] = ("jsonl", "tensorboard", "wandb")
"""Every valid `engine.loggers` entry; `jsonl` (metrics.jsonl) is always written."""

RUN_ID_FILE = "wandb/run_id"
"""Where a run directory keeps its W&B run id (relative to the run directory)."""

WANDB_MISSING = "engine.loggers includes 'wandb' but the wandb package is not installed: pip install 'rlhf_engine[wandb]'"


class MissingLoggerPackage(ConfigError, ImportError):
    """`engine.loggers` asks for a sink whose package is not installed (a config error: the CLI prints
    it as one line)."""


class MetricSink(Protocol):
    """A destination of step metrics."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the numeric metrics of `step`."""

    def close(self) -> None:
        """Finish; called once."""


class TensorBoardSink:
    """Scalars to `run_dir/tensorboard` (event files for `tensorboard --logdir`)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


def import_wandb():
    """The `wandb` module, or a `MissingLoggerPackage` error that names the extra to install."""
    try:
        import wandb
    except ImportError as e:
        raise MissingLoggerPackage(WANDB_MISSING) from e
    return wandb


class WandbSink:
    """A W&B run in `run_dir/wandb/`: the run config at start, every step's metrics, and on close the
    timeline as a table and the plots of `rlhf-engine plot` as images.

    One run directory is one W&B run: a resumed run continues the W&B run of its first start (`RUN_ID_FILE`).
    W&B keeps the rows it already has: steps after the checkpoint that the resumed run trains again keep
    their first values there (metrics.jsonl holds the new ones), since a W&B history cannot be rewound offline.
    Project, entity and mode come from W&B's own settings (`WANDB_PROJECT`, `WANDB_ENTITY`,
    `WANDB_MODE=offline`, `wandb login`). The run is finished on close, and W&B's background service is
    stopped when no other W&B run of this process is active: nothing of W&B outlives the logger.
    """

    def __init__(self, run_dir: Path, run_config: dict[str, Any] | None, resumed: bool = False) -> None:
        self._wandb = import_wandb()
        self.run_dir = run_dir
        self.run_id = self._run_id(run_dir, resumed)
        self._run = self._wandb.init(dir=str(run_dir), name=run_dir.name, id=self.run_id, resume="allow",
                                     config=run_config or {}, reinit="create_new",
                                     settings=self._wandb.Settings(console="off"))
        self._last_step: int | None = None

    def _run_id(self, run_dir: Path, resumed: bool) -> str:
        """The W&B run id of `run_dir`: made when a run starts from step 0 and kept in `run_dir/wandb/run_id`,
        so that a resumed run (`--resume RUN_DIR`) logs into the same W&B run instead of starting a new one (a
        fresh run in the same directory gets a new id: W&B would drop its steps at or below the old run's)."""
        path = run_dir / RUN_ID_FILE
        if resumed and path.is_file():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(6)  # W&B run ids: letters and digits
        path.write_text(run_id + "\n")
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)
        self._last_step = step

    def close(self) -> None:
        from rlhf_engine.telemetry.files import TIMELINE_FILE, read_jsonl
        from rlhf_engine.telemetry.plots import plot_run

        try:
            if self._last_step is not None:  # the end-of-run extras belong to the last step's row
                extras: dict[str, Any] = {}
                timeline = read_jsonl(self.run_dir / TIMELINE_FILE)
                if timeline:
                    t0 = min(iv["start"] for iv in timeline)
                    extras["timeline"] = self._wandb.Table(
                        columns=["proc", "phase", "start_s", "end_s"],
                        data=[[iv["proc"], iv["phase"], iv["start"] - t0, iv["end"] - t0] for iv in timeline])
                for png in plot_run(self.run_dir):
                    extras[f"plots/{png.stem}"] = self._wandb.Image(str(png))
                self._run.log(extras, step=self._last_step)
        finally:
            self._run.finish()
            if self._wandb.run is None:  # no run of the user's is active: stop W&B's service process
                self._wandb.teardown()


def make_sinks(names: Sequence[str], run_dir: Path, run_config: dict[str, Any] | None,
               resumed: bool = False) -> list[MetricSink]:
    """The sinks of `names` (`jsonl` is written by `MetricsLogger` itself and skipped here); `resumed`: the run
    continues from a checkpoint (W&B continues its run).

    `tensorboard` without the tensorboard package is skipped with a log line (it is on by default);
    `wandb` without the wandb package raises `MissingLoggerPackage`.
    """
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown loggers {unknown}; choose from {list(LOGGERS)}")
    sinks: list[MetricSink] = []
    try:
        if "tensorboard" in names:
            try:
                sinks.append(TensorBoardSink(run_dir))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", run_dir / "metrics.jsonl")
        if "wandb" in names:
            sinks.append(WandbSink(run_dir, run_config, resumed))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
