"""The control channel's IO thread: ROUTER (the trainer binds) <-> DEALER (each generator connects).

One loop per end reads bursts of messages, sends what the user threads queued in the
outbox, and sends heartbeats on time. What the messages mean lives elsewhere: the session
(handshake, heartbeats, roster) in ``session.py``, weight distribution (publish, acks,
shared-memory buffers) in ``distribution.py``, its generator side in ``receiver.py``, the per-host
relay in ``relay.py``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time

import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.iothread import IoThread
from rlhf_engine.transport.wire import WireError

log = logging.getLogger(__name__)

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
