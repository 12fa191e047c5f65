"""A daemon thread that owns one ZeroMQ socket; user threads reach it only through queues.

The socket is created and bound/connected by the caller (so address errors raise there),
then used only by the thread, which closes it (with linger) when it stops. A crash inside
the thread is kept and re-raised to the user by ``check()``. ``close()`` is idempotent and
returns within about ``join_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter

import zmq

from rlhf_engine.transport.drops import DropLog
from rlhf_engine.transport.errors import TransportClosed, TransportError

log = logging.getLogger(__name__)


class IoThread:
    def __init__(self, name: str, sock: zmq.Socket, linger_ms: int, drop_log_interval_s: float = 10.0) -> None:
        self.name = name
        self.stats: Counter[str] = Counter()
        """Message counters: ``sent``, ``received``, ``dropped.<reason>``, ..."""
        self._drops = DropLog(name, self.stats, drop_log_interval_s)
        self._sock = sock
        self._linger_ms = linger_ms
        self._stop = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._poller.register(self._sock, 0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- thread side -------------------------------------------------------
    def _loop(self) -> None:  # implemented by each channel
        raise NotImplementedError

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # crosses to the user as data, via check()
            self._error = e
            log.exception("transport thread %s failed", self.name)
        finally:
            self._sock.close(linger=self._linger_ms)

    def _poll(self, want_in: bool, want_out: bool, timeout_ms: float) -> tuple[bool, bool]:
        """Wait for the socket (or a wake-up); returns (readable, writable)."""
        flags = (zmq.POLLIN if want_in else 0) | (zmq.POLLOUT if want_out else 0)
        self._poller.modify(self._sock, flags)
        events = dict(self._poller.poll(timeout_ms))
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        ev = events.get(self._sock, 0)
        return bool(ev & zmq.POLLIN), bool(ev & zmq.POLLOUT)

    def _drop(self, reason: str, detail: str) -> None:
        self._drops.drop(reason, detail)

    # ---- user side ---------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or already closed

    def check(self) -> None:
        """Raise if the thread failed or the channel is closed."""
        if self._error is not None:
            raise TransportError(f"transport thread {self.name} failed: {self._error!r}") from self._error
        if self._closed:
            raise TransportClosed(f"{self.name} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, join_timeout_s: float = 1.0) -> bool:
        """Stop the thread (it closes the socket); False if it did not stop in time."""
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        self._stop.set()
        self.wake()
        if self._thread.is_alive():
            self._thread.join(join_timeout_s)
        elif self._thread.ident is None:  # never started: close the socket here
            self._sock.close(linger=self._linger_ms)
        if self._thread.is_alive():
            log.error("transport thread %s did not stop within %.1f s", self.name, join_timeout_s)
            return False
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        return True
