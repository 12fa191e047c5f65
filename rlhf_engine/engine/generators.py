"""The generator processes an engine starts on its own machine: start, notice exits, restart
within a budget, stop (with everything they started).

Generator `i` runs as `rlhf-engine generator --name generator-i` and logs to
`run_dir/generator-i.log`; its k-th replacement is named `generator-i.k` (so the transport and
the rollouts tell the processes apart) and appends to the same log. A replacement can start from
weights the engine saved (`--weights FILE --weights-version V`) so that it samples with the
newest policy from its first batch.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_engine.common.procs import start_child, stop_child
from rlhf_engine.engine.cpu_plan import CpuPlan
from rlhf_engine.transport.shm import owned_prefix

LOG_TAIL_LINES = 15


class GeneratorExited(RuntimeError):
    """A local generator process exited when it should not have; the message ends with its log tail."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class RestartBudgetExceeded(RuntimeError):
    """More generator restarts within the window than `engine.max_generator_restarts` allows."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    staging_dir: str


class LocalGenerators:
    """Generator child processes for one run.

    config_path: the run's saved config (the children read it); endpoint: the trainer's (they connect
    to it); shm_dir: where each child gets a staging folder of its own; cpu_plan: the cores and threads of
    each child (`rlhf_engine.engine.cpu_plan`); max_restarts within window_s:
    the restart budget of all children together.
    """

    def __init__(self, config_path: Path, run_dir: Path, endpoint: str, shm_dir: str, *,
                 cpu_plan: CpuPlan | None = None, max_restarts: int = 3, window_s: float = 3600.0) -> None:
        self.config_path = Path(config_path)
        self.run_dir = Path(run_dir)
        self.endpoint = endpoint
        self.shm_dir = shm_dir
        self.cpu_plan = cpu_plan
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts = 0
        """Restarts over the whole run."""
        self._children: dict[int, _Child] = {}
        self._starts: dict[int, int] = collections.Counter()
        self._restart_times: collections.deque[float] = collections.deque()

    def log_path(self, i: int) -> Path:
        return self.run_dir / f"generator-{i}.log"

    def name(self, i: int) -> str:
        """The current process name of generator `i` (its transport sender id starts with it + '@')."""
        return self._children[i].name

    def start(self, i: int, *, weights: Path | None = None, version: int = 0) -> None:
        """Start generator `i` (again); `weights` (a safetensors file of policy `version`) replaces the
        weights it loads from the policy folder before it connects."""
        n = self._starts[i]
        name = f"generator-{i}" if n == 0 else f"generator-{i}.{n}"
        args = ["-m", "rlhf_engine.cli", "generator", "--config", str(self.config_path), "--name", name,
                "--connect", self.endpoint]
        if weights is not None:
            args += ["--weights", str(weights), "--weights-version", str(version)]
        # its own folder for the weight staging file: removed when it stops, also after a SIGKILL of the child;
        # named for this (the engine's) process, so a run that starts after the engine itself was killed sweeps
        # it (`transport.shm.remove_stale_files`)
        staging = tempfile.mkdtemp(prefix=owned_prefix(name),
                                   dir=self.shm_dir if os.path.isdir(self.shm_dir) else None)
        args += ["--set", f"generator.staging_dir={staging}"]
        env = self.cpu_plan.generator_env(i) if self.cpu_plan is not None else {}
        cpus = self.cpu_plan.generator_cpus[i] if self.cpu_plan is not None else None
        try:
            proc = start_child(args, log_path=self.log_path(i), env=env, cpus=cpus)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._children[i] = _Child(name, proc, staging)
        self._starts[i] += 1

    def count_restart(self, now: float | None = None) -> None:
        """Charge one restart to the budget; `RestartBudgetExceeded` when it is spent."""
        now = time.monotonic() if now is None else now
        while self._restart_times and now - self._restart_times[0] > self.window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            raise RestartBudgetExceeded(
                f"{len(self._restart_times)} generator restarts within {self.window_s:g} s "
                f"(engine.max_generator_restarts={self.max_restarts}, engine.restart_window_s={self.window_s:g})"
            )
        self._restart_times.append(now)
        self.restarts += 1

    def exited(self, indices: list[int] | None = None) -> list[tuple[int, int]]:
        """(index, exit code) of the generators (of `indices`, default all) whose process has exited."""
        out = []
        for i, child in self._children.items():
            if (indices is None or i in indices) and child.proc.poll() is not None:
                out.append((i, child.proc.returncode))
        return out

    def running(self) -> int:
        """Generator processes alive now."""
        return sum(c.proc.poll() is None for c in self._children.values())

    def exit_error(self, i: int, what: str) -> GeneratorExited:
        """A `GeneratorExited` for generator `i`: `what` happened, with the last lines of its log."""
        code = self._children[i].proc.returncode
        return GeneratorExited(i, f"{self._children[i].name} exited with code {code} {what}; see "
                                  f"{self.log_path(i)}; its last lines:\n{self.log_tail(i)}")

    def log_tail(self, i: int, lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_path(i)
        if not path.is_file():
            return "  (no log)"
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
        return "\n".join(f"  | {line}" for line in tail)

    def stop(self, i: int, grace_s: float = 10.0) -> None:
        """Stop generator `i` and every process it started (also when it is already dead), and remove
        its staging folder."""
        try:
            stop_child(self._children[i].proc, grace_s=grace_s)
        finally:  # also when a second signal cuts the wait short (the child then ends with us: PDEATHSIG)
            shutil.rmtree(self._children[i].staging_dir, ignore_errors=True)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every generator; the first waits up to `grace_s`, the others only what is left of it. Every
        staging folder is removed, also when a signal (torchrun stopping the ranks) interrupts the stops."""
        deadline = time.monotonic() + grace_s
        try:
            for i in list(self._children):
                self.stop(i, grace_s=max(0.0, deadline - time.monotonic()))
        finally:
            for child in self._children.values():
                shutil.rmtree(child.staging_dir, ignore_errors=True)
            self._children.clear()

    def __len__(self) -> int:
        return len(self._children)
