"""`Sandbox`: run untrusted tool code (Python the policy wrote during a rollout) in a child process under limits.

    Sandbox.run_python(code)          this process: feeds stdin, reads output (at most `output_bytes`), wall clock
      -> supervisor                   `sandbox_supervisor.py` as a script (`python -I -S`), own session; subreaper
           -> init                    pid 1 of fresh user + pid (+ net) namespaces where the OS allows
                -> tool               `python -I tool.py` in a fresh temp dir; RLIMIT_CPU / RLIMIT_AS with hard = soft;
                                      a seccomp filter makes its forks wait for the supervisor's answer

Every way a run can end comes back as a `ToolResult`, never an exception. When `run_python` returns, no process
of the run is left: the supervisor kills every descendant it has (orphans of the tool, e.g. a double-forked
`setsid` grandchild, are reparented to it as child subreaper) until it has no child left, and with namespaces the
kernel also kills the whole pid namespace when `init` exits. The parent speaks to the supervisor over a socket
pair: its end closing (a stop, or the parent dying) makes the supervisor kill everything; the supervisor answers
with one JSON object (the tool's exit status and CPU seconds), then exits. Nothing is pickled.

What holds where (`namespaces_available()` tells which case a machine is in):
- with unprivileged user namespaces: `network=False` is an empty network namespace (no interface up: every
  connection fails, loopback included); the tool sees only its own processes as signal targets and has no
  capability outside its namespace, so it cannot raise its hard limits even when the engine runs as root.
- without (e.g. a container whose seccomp profile refuses `unshare`): `network=False` is best-effort (not
  isolated; `Sandbox()` logs a warning), and a tool can signal any process of its user, the supervisor
  included (killing it before the sweep could leave orphans running); run as root, it can raise its own
  rlimits (the wall clock still holds).
- in both: the filesystem is not isolated (the tool reads and writes whatever its user can, other processes'
  `/proc/PID/environ` included); only the environment is scrubbed (PATH and LANG). `max_processes` is exact:
  a seccomp filter makes every fork of the tool's processes wait for the supervisor's yes or no (EAGAIN), so
  not even a fork bomb gets past it.

Linux only: x86-64 or aarch64, kernel >= 5.5 (seccomp user notification with CONTINUE, pidfd), /proc.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal

from rlhf_engine.envs import sandbox_supervisor
from rlhf_engine.envs.sandbox_supervisor import processes

log = logging.getLogger(__name__)

# How a run ended: see `ToolResult.status`
ToolStatus = Literal["ok", "error", "timeout", "output_limit", "memory", "failed"]

_SUPERVISOR = sandbox_supervisor.__file__
"""The supervisor script each run starts (`python -I -S`)."""
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}  # all the tool's environment
_GRACE_S = 2.0  # after a stop request or the supervisor's report: the wait before its session is SIGKILLed
_CHUNK = 65536
_CPU_SLACK_S = 0.1  # a tool SIGKILLed at RLIMIT_CPU may show a few ms less in its rusage (seen: 0.995 s of 1)
_MIN_MEMORY = 32 << 20  # the interpreter alone maps ~15 MiB


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of every run of a `Sandbox`: set by the config, never by the tool."""

    wall_s: float = 5.0
    """Wall-clock seconds per run, from the start of the supervisor; at it every process of the run is killed."""
    cpu_s: int = 5
    """CPU seconds of the tool process: RLIMIT_CPU, whole seconds (the kernel's unit), hard = soft. A process the
    tool forks starts with the same budget of its own; `wall_s` bounds them all."""
    memory_bytes: int = 512 << 20
    """Address space of each tool process: RLIMIT_AS, hard = soft."""
    output_bytes: int = 16384
    """stdout + stderr kept; at one byte more the run is killed and the output cut (status "output_limit")."""
    max_processes: int = 1
    """Most processes the tool may start in all, itself included: its first `max_processes - 1` forks go ahead
    (threads are not counted), later ones fail with EAGAIN as at RLIMIT_NPROC (1: the tool cannot fork)."""
    max_concurrent: int = 4
    """Runs at once per `Sandbox`; further calls wait for a slot."""
    network: bool = False
    """False: the tool gets an empty network namespace where the OS allows (`namespaces_available()`), else
    best-effort (no isolation, a warning at `Sandbox()`). True: the host's network."""

    def __post_init__(self) -> None:
        if not (isinstance(self.wall_s, (int, float)) and math.isfinite(self.wall_s) and self.wall_s > 0):
            raise ValueError(f"wall_s ({self.wall_s!r}) must be a finite number of seconds > 0")
        if not isinstance(self.cpu_s, int) or isinstance(self.cpu_s, bool) or self.cpu_s < 1:
            raise ValueError(f"cpu_s ({self.cpu_s!r}) must be a whole number of seconds >= 1 (RLIMIT_CPU's unit)")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < _MIN_MEMORY:
            raise ValueError(f"memory_bytes ({self.memory_bytes!r}) must be an int >= {_MIN_MEMORY} (32 MiB: the "
                             f"interpreter alone maps ~15 MiB)")
        for name in ("output_bytes", "max_processes", "max_concurrent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an int >= 1")
        if not isinstance(self.network, bool):
            raise ValueError(f"network ({self.network!r}) must be a bool")


@dataclass(frozen=True)
class ToolResult:
    """How one run ended. Every failure is a status here, never an exception."""

    status: ToolStatus
    """"ok" (exit 0), "error" (nonzero exit, an exception, a signal), "timeout" (wall clock or CPU),
    "output_limit", "memory" (the tool died of a MemoryError), "failed" (could not start, or the sandbox was
    closed)."""
    output: str
    """stdout and stderr as they interleaved, utf-8 (errors replaced), cut at `output_bytes` with a marker line."""
    seconds: float
    """Wall-clock seconds of the run, from before the supervisor starts until every process is gone."""
    detail: str = ""
    """Why, for any status but "ok": e.g. "wall-clock limit (5.0 s)", "exit code 1"."""


@functools.cache
def namespaces_available() -> bool:
    """Whether this machine lets an unprivileged process create user, pid and network namespaces (checked once
    per process by starting a supervisor that tries)."""
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", _SUPERVISOR, "--probe"],
                               capture_output=True, env=_ENV, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.info("no namespaces for the sandbox: the probe did not run (%s)", e)
        return False
    if probe.returncode != 0:
        log.info("no namespaces for the sandbox: %s", probe.stderr.decode(errors="replace").strip()[-300:])
    return probe.returncode == 0


class Sandbox:
    """Runs tool code under `limits`, from any number of threads (`max_concurrent` at once).

    `close()` (or leaving a `with` block) ends the runs still going and refuses later ones.
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits
        self.namespaces = namespaces_available()
        """Whether runs get their own user + pid (+ net) namespaces (see the module docstring)."""
        if not limits.network and not self.namespaces:
            log.warning("Sandbox(network=False) is best-effort here: no user namespaces, so tool code shares the "
                        "host's network")
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()  # one byte written by close(): readable in every run's selector

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every run still going (they return "failed", "sandbox closed"), wait until their processes are
        gone, and make later `run_python` calls return that too. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.write(self._wake_w, b"x")
            while self._active:
                self._idle.wait()
            if self._wake_r >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def run_python(self, code: str, stdin: str = "") -> ToolResult:
        """Run `code` as a script (`python -I tool.py` in a fresh temp dir) with `stdin`; thread-safe. Waits for
        one of `max_concurrent` slots first."""
        closed = ToolResult("failed", "", 0.0, "sandbox closed")
        if self._closed:
            return closed
        with self._slots:
            with self._lock:
                if self._closed:
                    return closed
                self._active += 1
            try:
                return self._run(code, stdin)
            finally:
                with self._lock:
                    self._active -= 1
                    self._idle.notify_all()

    def _run(self, code: str, stdin: str) -> ToolResult:
        start = time.monotonic()
        try:
            workdir = tempfile.mkdtemp(prefix="rlhf-sandbox-")
        except OSError as e:
            return ToolResult("failed", "", time.monotonic() - start, f"no temp dir: {e}")
        try:
            with open(os.path.join(workdir, "tool.py"), "w", encoding="utf-8", errors="replace") as f:
                f.write(code)
            ours, theirs = socket.socketpair()
            with ours:
                try:
                    with theirs:
                        config = {"ctl_fd": theirs.fileno(), "namespaces": self.namespaces,
                                  "network": self.limits.network, "cpu_s": self.limits.cpu_s,
                                  "memory_bytes": self.limits.memory_bytes, "max_processes": self.limits.max_processes}
                        proc = subprocess.Popen(
                            [sys.executable, "-I", "-S", _SUPERVISOR, json.dumps(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir,
                            env=_ENV, start_new_session=True, close_fds=True, pass_fds=(theirs.fileno(),))
                except OSError as e:
                    return ToolResult("failed", "", time.monotonic() - start, f"could not start the supervisor: {e}")
                run = _Run(proc, ours, self._wake_r, self.limits, start)
                run.communicate(stdin.encode("utf-8", errors="replace"))
            return run.result(time.monotonic() - start)
        except OSError as e:  # writing tool.py, a socket pair
            return ToolResult("failed", "", time.monotonic() - start, f"could not start: {e}")
        finally:
            _remove_tree(workdir)


class _Run:
    """The parent's side of one run: stdin in, output in (kept up to the limit), the report, the deadlines."""

    def __init__(self, proc: subprocess.Popen, ctl: socket.socket, wake_fd: int, limits: SandboxLimits,
                 start: float) -> None:
        self.proc, self.ctl, self.wake_fd, self.limits = proc, ctl, wake_fd, limits
        self.output = bytearray()
        self.truncated = False
        self.stop_reason: str | None = None  # "timeout" | "output_limit" | "closed"
        self.report = bytearray()
        self.ending = False  # stop requested or the supervisor done: `deadline` is then the grace deadline
        self.deadline = start + limits.wall_s

    def communicate(self, data: bytes) -> None:
        """Feed `data`, read until the supervisor and every holder of the output pipe are gone (or the grace after
        a stop ran out: then SIGKILL the supervisor's session), then reap the supervisor."""
        proc, sel = self.proc, selectors.DefaultSelector()
        out_fd, in_fd, ctl_fd = proc.stdout.fileno(), proc.stdin.fileno(), self.ctl.fileno()
        os.set_blocking(out_fd, False)
        for fd in (out_fd, ctl_fd, self.wake_fd):
            sel.register(fd, selectors.EVENT_READ)
        if data:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sent = 0
        try:
            while out_fd in sel.get_map() or ctl_fd in sel.get_map():
                left = self.deadline - time.monotonic()
                if left <= 0:
                    if self.ending:
                        break
                    self._stop("timeout")
                    continue
                for key, _ in sel.select(left):
                    if key.fd == out_fd:
                        chunk = os.read(out_fd, _CHUNK)
                        if not chunk:
                            sel.unregister(out_fd)
                        self._keep(chunk)
                    elif key.fd == ctl_fd:
                        chunk = self.ctl.recv(4096)
                        if not chunk:
                            sel.unregister(ctl_fd)
                            self._end_soon()
                        self.report += chunk[:65536 - len(self.report)]
                    elif key.fd == self.wake_fd:
                        sel.unregister(self.wake_fd)
                        self._stop("closed")
                    else:
                        try:
                            sent += os.write(in_fd, data[sent:sent + _CHUNK])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the tool closed its stdin, or exited
                            sent = len(data)
                        if sent == len(data):
                            sel.unregister(in_fd)
                            proc.stdin.close()
        finally:
            sel_map = set(sel.get_map())
            sel.close()
            if not proc.stdin.closed:
                proc.stdin.close()
            proc.stdout.close()
            # The supervisor is not reaped yet, so its pid still names its group and session. Without its report
            # it may have left init's group running: kill its whole session (a setsid'd process may escape this).
            if ctl_fd in sel_map or not self.report:
                _kill_session(proc.pid)
            _kill_group(proc.pid)
            proc.wait()

    def _keep(self, chunk: bytes) -> None:
        if self.truncated:
            return  # drained, not kept
        room = self.limits.output_bytes - len(self.output)
        self.output += chunk[:room]
        if len(chunk) > room:
            self.truncated = True
            self._stop("output_limit")

    def _stop(self, reason: str) -> None:
        """Ask the supervisor to kill the run (its end of the socket reads EOF)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        try:
            self.ctl.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the supervisor is gone already
        self._end_soon()

    def _end_soon(self) -> None:
        if not self.ending:
            self.ending = True
            self.deadline = time.monotonic() + _GRACE_S

    def result(self, seconds: float) -> ToolResult:
        limits = self.limits
        text = self.output.decode("utf-8", errors="replace")
        if self.truncated:
            text += f"\n[output truncated at {limits.output_bytes} bytes]"

        def done(status: ToolStatus, detail: str = "") -> ToolResult:
            return ToolResult(status, text, seconds, detail)

        if self.stop_reason == "closed":
            return done("failed", "sandbox closed")
        if self.stop_reason == "output_limit":
            return done("output_limit", f"more than {limits.output_bytes} bytes of output")
        if self.stop_reason == "timeout":
            return done("timeout", f"wall-clock limit ({limits.wall_s} s)")
        try:
            report = json.loads(self.report)
        except ValueError:
            return done("failed", f"the supervisor exited ({self.proc.returncode}) without a report")
        if report["error"]:
            return done("failed", report["error"])
        code, sig = report["exit"], report["signal"]
        if sig in (signal.SIGKILL, signal.SIGXCPU) and report["cpu_s"] >= limits.cpu_s - _CPU_SLACK_S:
            return done("timeout", f"CPU limit ({limits.cpu_s} s)")
        if code == 0:
            return done("ok")
        if code is not None and text.rstrip().rpartition("\n")[2].startswith("MemoryError"):
            return done("memory", f"memory limit ({limits.memory_bytes} bytes)")
        if sig is not None:
            return done("error", f"killed by {signal.Signals(sig).name}")
        if code is None:
            return done("error", "the tool's exit status is unknown (its init process was killed)")
        return done("error", f"exit code {code}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_session(sid: int) -> None:
    for pid, _, session in processes():
        if session == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _remove_tree(path: str) -> None:
    """Remove the run's temp dir, also when the tool made parts of it read-only; a failure is logged, not raised."""
    def writable_and_retry(func, failed: str, _exc) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
        func(failed)

    try:
        shutil.rmtree(path, onerror=writable_and_retry)
    except OSError as e:
        log.warning("sandbox temp dir %s left behind: %s", path, e)
