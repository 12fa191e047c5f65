"""One-way channels: a bounded send queue in front of a socket, and a bounded receive queue behind one.

Back-pressure: a full receive queue stops the receiving thread from reading its socket,
the sockets' high-water marks fill, the sending thread stops sending, the send queue fills
and ``SendChannel.send`` blocks — logging after ``blocked_log_s`` and raising
``BackpressureTimeout`` after its timeout. Nothing is dropped and memory stays bounded.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import torch
import zmq

from rlhf_engine.transport.errors import BackpressureTimeout
from rlhf_engine.transport.iothread import IoThread
from rlhf_engine.transport.wire import Header, WireError, WireLimits, decode, encode

log = logging.getLogger(__name__)

_POLL_MS = 100
_RECV_BURST = 256


class SendChannel(IoThread):
    """Encodes in the caller's thread, sends from the IO thread, in order."""

    def __init__(self, name: str, sock: zmq.Socket, *, queue_size: int, linger_ms: int,
                 blocked_log_s: float, health: Callable[[], None] = lambda: None) -> None:
        super().__init__(name, sock, linger_ms)
        self._queue: queue.Queue[list] = queue.Queue(maxsize=queue_size)
        self._blocked_log_s = blocked_log_s
        self._health = health
        self._pending: list | None = None
        self._lock = threading.Lock()
        self._seq = 0

    @property
    def depth(self) -> int:
        """Messages waiting in this process (queue + one being sent)."""
        return self._queue.qsize() + (self._pending is not None)

    def send(self, make: Callable[[int], tuple[Header, Sequence[torch.Tensor]]], timeout_s: float) -> None:
        """Queue the message ``make(seq)`` builds; block while the queue is full."""
        self.check()
        self._health()
        with self._lock:
            header, tensors = make(self._seq)
            frames = encode(header, tensors)
            start = time.monotonic()
            logged = False
            while True:
                try:
                    self._queue.put(frames, timeout=min(0.1, timeout_s))
                    break
                except queue.Full:
                    waited = time.monotonic() - start
                    self.check()
                    self._health()
                    if waited >= timeout_s:
                        raise BackpressureTimeout(
                            f"{self.name}: send blocked {waited:.1f} s (timeout {timeout_s} s): the receiver is not "
                            f"consuming; {self._queue.qsize()} messages queued here"
                        ) from None
                    if not logged and waited >= self._blocked_log_s:
                        log.warning("%s: send blocked for %.1f s by back-pressure (receiver slow); waiting up to %.0f s",
                                    self.name, waited, timeout_s)
                        logged = True
            self._seq += 1
        self.wake()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued message was handed to the socket; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.depth and time.monotonic() < deadline:
            self.check()
            time.sleep(0.005)
        return not self.depth

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._pending is None:
                try:
                    self._pending = self._queue.get_nowait()
                except queue.Empty:
                    self._poll(False, False, _POLL_MS)
                    continue
            try:
                self._sock.send_multipart(self._pending, flags=zmq.NOBLOCK, copy=False)
                self._pending = None
                self.stats["sent"] += 1
            except zmq.Again:
                self._poll(False, True, _POLL_MS)


class BoundedQueue:
    """A FIFO bounded in items and in bytes (an item larger than ``max_bytes`` still fits alone)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._items: collections.deque[tuple[object, int]] = collections.deque()
        self.nbytes = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item, nbytes: int, timeout_s: float) -> bool:
        """Append ``item`` (``nbytes`` long); False if it did not fit within ``timeout_s``."""
        with self._cond:
            full = lambda: self._items and (len(self._items) >= self._max_items
                                            or self.nbytes + nbytes > self._max_bytes)
            if full() and not self._cond.wait_for(lambda: not full(), timeout_s):
                return False
            self._items.append((item, nbytes))
            self.nbytes += nbytes
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float):
        """The oldest item, or None after ``timeout_s``."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: self._items, timeout_s):
                return None
            item, nbytes = self._items.popleft()
            self.nbytes -= nbytes
            self._cond.notify_all()
            return item


class RecvChannel(IoThread):
    """Validates each message against ``limits``, converts it with ``accept(header, tensors, user_id)``
    (``user_id``: the ZAP User-Id of the authenticated connection, None without CURVE) and queues
    the result; ``accept`` raises ``WireError`` to drop a message (counted and logged by reason).

    Memory: at most ``queue_size`` items and ``queue_bytes`` bytes of tensors queued here."""

    def __init__(self, name: str, sock: zmq.Socket, *, queue_size: int, linger_ms: int, limits: WireLimits,
                 accept: Callable[[Header, list[torch.Tensor], str | None], object],
                 queue_bytes: int = 1 << 62, drop_log_interval_s: float = 10.0) -> None:
        super().__init__(name, sock, linger_ms, drop_log_interval_s)
        self._queue = BoundedQueue(queue_size, queue_bytes)
        self._limits = limits
        self._accept = accept

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queue.nbytes

    def get(self, timeout_s: float | None, health: Callable[[], None] = lambda: None):
        """The next item, or None after ``timeout_s`` (None = wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.check()
            health()
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            item = self._queue.get(max(left, 0.0))
            if item is not None or (deadline is not None and time.monotonic() >= deadline):
                return item

    def _loop(self) -> None:
        while not self._stop.is_set():
            readable, _ = self._poll(True, False, _POLL_MS)
            if not readable:
                continue
            for _ in range(_RECV_BURST):
                try:
                    frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    header, tensors = decode(frames, self._limits)
                    item = self._accept(header, tensors, frame_user_id(frames[0]))
                except WireError as e:
                    self._drop(e.reason, e.detail)
                    continue
                self.stats["received"] += 1
                nbytes = sum(spec.nbytes for spec in header.tensors)
                while not self._queue.put(item, nbytes, 0.1):
                    if self._stop.is_set():
                        return


def frame_user_id(frame) -> str | None:
    """The ZAP User-Id of the connection ``frame`` came through (CURVE: the client's z85 public key)."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError):
        return None  # no ZAP handler on this socket (ipc without CURVE)
