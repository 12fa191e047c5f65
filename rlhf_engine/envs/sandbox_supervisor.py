"""The sandbox's supervisor: `rlhf_engine.envs.sandbox` runs this file as a script (`python -I -S`, the standard
library only) once per tool run; see that module for what it does and guarantees.

    python sandbox_supervisor.py '<json config>'    supervise one run (the parent speaks over an inherited socket)
    python sandbox_supervisor.py --probe            exit 0 when user + pid + net namespaces can be entered
"""

from __future__ import annotations

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
    for pid, ppid, _ in processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def processes() -> list[tuple[int, int, int]]:
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
