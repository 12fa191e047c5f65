"""The trainer's ipc endpoint: a private directory of its own, and a lock so no run takes over another's.

Without a configured endpoint the trainer makes a fresh directory (mode 0700, so only this
user's processes can reach the sockets in it) and binds ``ipc://DIR/engine``; it removes the
directory when it closes. Binding an ``ipc://`` endpoint takes an exclusive ``flock`` on
``PATH.lock`` (holding the owner's pid) next to the sockets: while the owner lives (the kernel
drops the lock when it dies, also on SIGKILL) a second trainer is refused with
``EndpointInUseError`` instead of silently unlinking and re-binding the sockets.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

from rlhf_engine.transport.errors import EndpointInUseError

SOCKET_NAME = "engine"


class IpcEndpoint:
    """Owns the trainer's base endpoint: ``endpoint`` is what generators connect to."""

    def __init__(self, endpoint: str | None, ipc_dir: str | None = None) -> None:
        self._dir: str | None = None
        self._lock_fd: int | None = None
        if endpoint is None:
            self._dir = tempfile.mkdtemp(prefix="rlhf-engine-", dir=ipc_dir)  # mode 0700
            endpoint = f"ipc://{self._dir}/{SOCKET_NAME}"
        self.endpoint = endpoint
        if endpoint.startswith("ipc://"):
            try:
                self._lock(endpoint[len("ipc://"):] + ".lock")
            except BaseException:
                self.close()
                raise

    def _lock(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EndpointInUseError(
                f"endpoint {self.endpoint} is held by a live run (pid {owner}, lock {path}): stop that run "
                f"or set another transport.endpoint (leave it unset for a private one)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_path, self._lock_fd = path, fd

    def close(self) -> bool:
        """Release the lock and remove what this object made (idempotent)."""
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return True
