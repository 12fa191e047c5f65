"""`Sandbox`: run untrusted tool code (Python the policy wrote during a rollout) in a child process under limits.

    Sandbox.run_python(code)          this process: feeds stdin, reads output (at most `output_bytes`), wall clock
      -> supervisor                   this file as a script (`python -I -S`), in its own session; child subreaper
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

# The supervisor runs this file as a script and stops at the `__main__` guard below, before the imports only the
# parent needs (dataclasses, subprocess, logging, ...: ~25 ms more startup on every run).
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000

# seccomp (linux/seccomp.h, linux/filter.h, linux/audit.h)
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_NOTIF_RECV = 0xC0502100  # SECCOMP_IOCTL_NOTIF_RECV: _IOWR('!', 0, struct seccomp_notif), 80 bytes
_NOTIF_SEND = 0xC0182101  # SECCOMP_IOCTL_NOTIF_SEND: _IOWR('!', 1, struct seccomp_notif_resp), 24 bytes
_NO_SYSCALL = 0xFFFFFFFF
# machine: (AUDIT_ARCH_*, seccomp, clone, fork, vfork, clone3); aarch64 has no fork/vfork
_ARCHES = {"x86_64": (0xC000003E, 317, 56, 57, 58, 435), "aarch64": (0xC00000B7, 277, 220, _NO_SYSCALL, _NO_SYSCALL, 435)}

# ---- the supervisor: this file run as a script (`python -I -S`: stdlib only) ----


def _supervise(config: dict) -> int:
    """Start init (which starts the tool), answer the tool's forks, kill every descendant once init exits or the
    parent's end of the control socket `config["ctl_fd"]` closes, write the report there (one JSON object)."""
    ctl = config["ctl_fd"]
    os.set_inheritable(ctl, False)
    report = {"exit": None, "signal": None, "cpu_s": 0.0, "error": None}
    libc = ctypes.CDLL(None, use_errno=True)
    # init and the tool send their news on `theirs`: see `_take_message`
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)
        if config["namespaces"]:
            _enter_namespaces(libc, network=config["network"])
        init = os.fork()
    except OSError as e:
        report["error"] = f"sandbox setup: {e}"
        os.write(ctl, json.dumps(report).encode())
        return 1
    if init == 0:
        os.close(ctl)
        ours.close()
        _init(libc, config, theirs)
    theirs.close()
    os.setpgid(init, init)  # as init does itself: whichever runs first
    _to_devnull()  # only the tool's processes hold the output pipe now
    news: dict = {"listener": None, "error": None, "status": None}
    try:
        _watch(init, ctl, ours, config["max_processes"], news)
    except OSError as e:
        news["error"] = f"sandbox supervisor: {e}"
    usage = _kill_descendants(init)
    ours.setblocking(False)
    try:
        while _take_message(ours, news):  # what init sent before it exited
            pass
    except BlockingIOError:
        pass
    if news["listener"] is not None:
        os.close(news["listener"])
    status = news["status"]
    if status is not None:
        report["exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        report["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    report["error"] = news["error"]
    if usage is not None:
        report["cpu_s"] = usage.ru_utime + usage.ru_stime  # init's and its reaped children's: the tool's
    os.write(ctl, json.dumps(report).encode())  # ~100 bytes: one write into an empty socket buffer
    return 0


def _init(libc: ctypes.CDLL, config: dict, theirs: socket.socket) -> NoReturn:
    """Fork the tool, reap every child until the tool exits, send its wait status. As pid 1 of a pid namespace,
    its exit makes the kernel kill everything left in it."""
    try:
        os.setpgid(0, 0)  # a group of its own, inherited by the tool: the supervisor kills it with one killpg
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
        tool = os.fork()
        if tool == 0:
            _exec_tool(libc, config, theirs)
        _to_devnull()
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == tool:
                break
        theirs.send(b"S" + struct.pack("=i", status))
    finally:
        os._exit(0)


def _exec_tool(libc: ctypes.CDLL, config: dict, theirs: socket.socket) -> NoReturn:
    """Set the limits (hard = soft: the tool cannot raise them back), install the fork gate, send its listener to
    the supervisor, exec the tool."""
    try:
        for which, value in ((resource.RLIMIT_CPU, config["cpu_s"]), (resource.RLIMIT_AS, config["memory_bytes"]),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        listener = _install_fork_gate(libc)
        socket.send_fds(theirs, [b"L"], [listener])
        os.close(listener)
        theirs.close()
        os.execv(sys.executable, [sys.executable, "-I", "tool.py"])
    except BaseException as e:
        try:
            theirs.send(f"Ethe tool did not start: {e!r}".encode()[:4096])
        finally:
            os._exit(127)


def _install_fork_gate(libc: ctypes.CDLL) -> int:
    """A seccomp filter on this process and all it starts: fork, vfork and clone (but a thread's) wait for the
    supervisor's answer on the returned listener fd; clone3 fails with ENOSYS (its flags are behind a pointer;
    libc then falls back to clone), as does every syscall of a foreign ABI (i386, x32, arm32)."""
    machine = os.uname().machine
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"max_processes needs a seccomp filter for {machine!r}: only {sorted(_ARCHES)}")
    arch, seccomp_nr, clone, fork, vfork, clone3 = _ARCHES[machine]
    enosys = _SECCOMP_RET_ERRNO | errno.ENOSYS
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..|JGE|K, ..|JSET|K, BPF_RET|K
    program = [  # (code, jump if true, jump if false, k); a jump skips that many instructions
        (ld, 0, 0, 4),  # 0: A = seccomp_data.arch
        (jeq, 1, 0, arch),  # 1: native ABI: to 3
        (ret, 0, 0, enosys),  # 2
        (ld, 0, 0, 0),  # 3: A = seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # 4: x32 syscall numbers: to 5
        (ret, 0, 0, enosys),  # 5
        (jeq, 0, 1, clone3),  # 6
        (ret, 0, 0, enosys),  # 7
        (jeq, 0, 2, clone),  # 8: clone: to 9, else to 11
        (ld, 0, 0, 16),  # 9: A = low 32 bits of args[0], clone's flags (little-endian)
        (jset, 3, 2, _CLONE_THREAD),  # 10: a thread: allow (14), else ask (13)
        (jeq, 1, 0, fork),  # 11
        (jeq, 0, 1, vfork),  # 12
        (ret, 0, 0, _SECCOMP_RET_USER_NOTIF),  # 13
        (ret, 0, 0, _SECCOMP_RET_ALLOW),  # 14
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in program))  # sock_filter[]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)  # required for seccomp without CAP_SYS_ADMIN; no setuid gains either
    fprog = SockFprog(len(program), ctypes.addressof(filters))
    listener = libc.syscall(seccomp_nr, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER,
                            ctypes.byref(fprog))
    if listener < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"seccomp(SET_MODE_FILTER, NEW_LISTENER): {os.strerror(code)} (Linux >= 5.5 needed)")
    return listener


def _watch(init: int, ctl: int, ours: socket.socket, max_processes: int, news: dict) -> None:
    """Answer the tool's forks (its first `max_processes - 1` go ahead, later ones fail with EAGAIN) and take the
    news on `ours`, until init exits or the parent's end of `ctl` closes."""
    pidfd = os.pidfd_open(init)
    poller = select.poll()
    for fd in (ctl, pidfd, ours.fileno()):
        poller.register(fd, select.POLLIN)
    forks_left = max_processes - 1
    try:
        while True:
            for fd, events in poller.poll():
                if fd in (ctl, pidfd):
                    return
                if fd == ours.fileno():
                    kind = _take_message(ours, news)
                    if not kind:
                        poller.unregister(fd)
                    elif kind == b"L":
                        poller.register(news["listener"], select.POLLIN)
                elif events & select.POLLIN:
                    forks_left -= _answer_fork(fd, forks_left > 0)
                else:  # POLLHUP: none of the tool's processes is left
                    poller.unregister(fd)
    finally:
        os.close(pidfd)


def _take_message(ours: socket.socket, news: dict) -> bytes:
    """One message into `news`; returns its kind: b"L" with the tool's seccomp listener fd, b"E" + why the tool
    did not start, b"S" + the tool's wait status (from init); b"" at the end (init and the tool are gone)."""
    message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
    kind, body = message[:1], message[1:]
    if kind == b"L" and fds:
        news["listener"] = fds[0]
    elif kind == b"E":
        news["error"] = body.decode(errors="replace")
    elif kind == b"S":
        (news["status"],) = struct.unpack("=i", body)
    return kind


def _answer_fork(listener: int, allow: bool) -> int:
    """Let one waiting fork go ahead (returns 1) or fail it with EAGAIN (returns 0), as at RLIMIT_NPROC."""
    notification = bytearray(80)  # struct seccomp_notif, zeroed as the kernel requires: id u64, pid u32, ...
    try:
        fcntl.ioctl(listener, _NOTIF_RECV, notification)
    except OSError:
        return 0  # the caller was killed meanwhile
    (notification_id,) = struct.unpack_from("=Q", notification)
    if allow:
        response = struct.pack("=QqiI", notification_id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    else:
        response = struct.pack("=QqiI", notification_id, 0, -errno.EAGAIN, 0)
    try:
        fcntl.ioctl(listener, _NOTIF_SEND, bytearray(response))
    except OSError:
        return 0  # the caller was killed meanwhile
    return int(allow)


def _kill_descendants(init: int) -> resource.struct_rusage | None:
    """SIGKILL every descendant and reap every child until none is left (killed processes' orphans come to us,
    the subreaper); returns init's rusage (its own and its reaped children's, the tool's among them)."""
    usage = None
    os.killpg(init, signal.SIGKILL)  # first, in one call: init's group, and with namespaces everything else too
    # (init's exit kills its pid namespace). Then the scan, for what left the group (setsid).
    while True:
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return usage
            if pid == 0:
                break
            if pid == init:
                usage = rusage
        time.sleep(0.001)


def _descendants(root: int) -> list[int]:
    """Every descendant of `root`, from the ppid fields of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, session) of every process in /proc."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
            except OSError:
                continue
            found.append((int(name), int(fields[1]), int(fields[3])))
    return found


def _enter_namespaces(libc: ctypes.CDLL, *, network: bool) -> None:
    """New user + pid (+ net unless `network`) namespaces for our next child, our uid and gid mapped to themselves."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWPID | (0 if network else _CLONE_NEWNET)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare: {os.strerror(code)}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


def _to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _probe() -> int:
    """`namespaces_available`'s check: enter the namespaces, start a child in them; 0 when it worked."""
    _enter_namespaces(ctypes.CDLL(None, use_errno=True), network=False)
    child = os.fork()
    if child == 0:
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


if __name__ == "__main__":
    sys.exit(_probe() if sys.argv[1] == "--probe" else _supervise(json.loads(sys.argv[1])))

# ---- the parent: `Sandbox` ----

import functools
import logging
import math
import selectors
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

# How a run ended: see `ToolResult.status`
ToolStatus = Literal["ok", "error", "timeout", "output_limit", "memory", "failed"]

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
        probe = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), "--probe"],
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
                            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
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
    for pid, _, session in _processes():
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
