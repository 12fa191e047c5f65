"""The IO threads: each a daemon thread that owns one ZeroMQ socket; user threads reach it only through queues.

The socket is created and bound/connected by the caller (so address errors raise there),
then used only by the thread, which closes it (with linger) when it stops. A crash inside
the thread is kept and re-raised to the user by ``check()``. ``close()`` is idempotent and
returns within about ``join_timeout_s``.

Dropped messages are counted per reason and logged at most once per reason per interval (``DropLog``):
a peer that floods us with bad messages cannot flood the log: the first drop of a reason is logged at
once, later ones are summed and logged as one line (with the count and the last detail) when the
interval has passed.

``ControlThread`` is the control channel's loop: ROUTER (the trainer binds) <-> DEALER (each generator
connects). It reads bursts of messages, sends what the user threads queued in the outbox, and sends
heartbeats on time. What the messages mean lives elsewhere: the session (handshake, heartbeats, roster)
in ``session.py``, weight distribution (publish and acks on the trainer, complete checked updates on the generator) in
``distribution.py``, the per-host relay in ``relay.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter

import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.errors import TransportClosed, TransportError
from rlhf_engine.transport.wire import WireError

log = logging.getLogger(__name__)

PREFIX = "dropped."
"""Stats key of a drop counter: ``dropped.<reason>``."""


class DropLog:
    """Counts drops into ``stats`` (``dropped.<reason>``) and logs them rate-limited."""

    def __init__(self, owner: str, stats: Counter[str], interval_s: float) -> None:
        self._owner = owner
        self._stats = stats
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def drop(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stats[PREFIX + reason] += 1
            self._unlogged[reason] += 1
            last = self._last_log.get(reason)
            if last is not None and now - last < self._interval_s:
                return
            count, self._unlogged[reason] = self._unlogged[reason], 0
            self._last_log[reason] = now
        if last is None:
            log.warning("%s: dropped a message (%s): %s", self._owner, reason, detail)
        else:
            log.warning("%s: dropped %d messages (%s) in the last %.0f s; last: %s",
                        self._owner, count, reason, now - last, detail)


def drop_counts(*stats: Counter[str]) -> dict[str, int]:
    """``{reason: count}`` summed over the ``dropped.<reason>`` entries of several stats counters."""
    out: Counter[str] = Counter()
    for counter in stats:
        for key, value in list(counter.items()):
            if key.startswith(PREFIX):
                out[key[len(PREFIX):]] += value
    return dict(out)


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


_RECV_BURST = 64


class ControlThread(IoThread):
    """Shared loop: read bursts (``_handle``), send the outbox, heartbeat on time (``_beat``)."""

    def __init__(self, name: str, sock: zmq.Socket, config: TransportConfig, sender_id: str) -> None:
        super().__init__(name, sock, config.linger_ms, config.drop_log_interval_s)
        self.config = config
        self.sender_id = sender_id
        self._seq = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()

    def header(self, cls, **fields):
        """A header of type ``cls`` from this end, with the next sequence number."""
        return cls(sender=self.sender_id, seq=next(self._seq), **fields)

    def enqueue(self, route: list, frames: list, sent=None) -> None:
        """Send ``frames`` (to ``route`` on the trainer) from the IO thread; ``sent.one_sent``
        is called with the frames' tracker once they were handed to ZeroMQ."""
        self._outbox.put((route, frames, sent))
        self.wake()

    def send_now(self, route: list, frames: list, sent=None) -> None:
        """Send from the IO thread itself."""
        try:
            tracker = self._sock.send_multipart(route + frames, flags=zmq.NOBLOCK, copy=False, track=sent is not None)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone; EAGAIN cannot happen (sndhwm=0)
            log.debug("%s: could not send to %r: %s", self.name, route, e)
            tracker = None
        if sent is not None:
            sent.one_sent(tracker)

    def _loop(self) -> None:
        self._on_start()
        next_beat = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, min(next_beat - time.monotonic(), 0.1))
            readable, _ = self._poll(True, False, wait * 1000)
            if readable:
                for _ in range(_RECV_BURST):
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._handle(frames)
                    except WireError as e:
                        self._drop(e.reason, e.detail)
            self._after_poll()
            while True:
                try:
                    route, frames, sent = self._outbox.get_nowait()
                except queue.Empty:
                    break
                self.send_now(route, frames, sent)
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self.config.heartbeat_interval_s
        self._on_stop()

    def _on_start(self) -> None:
        pass

    def _after_poll(self) -> None:
        pass

    def _on_stop(self) -> None:
        pass

    def _handle(self, frames: list) -> None:
        raise NotImplementedError

    def _beat(self) -> None:
        raise NotImplementedError
