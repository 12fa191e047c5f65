"""One-way channels: a bounded send queue in front of a socket, and a bounded receive queue behind one.

Back-pressure: a full receive queue stops the receiving thread from reading its socket,
the sockets' high-water marks fill, the sending thread stops sending, the send queue fills
and ``SendChannel.send`` blocks — logging after ``blocked_log_s`` and raising
``BackpressureTimeout`` after its timeout. Nothing is dropped and memory stays bounded.

Prompt batches, trainer -> generators: PUSH (the trainer binds) -> PULL (generators connect).

Queues are small (``prompt_queue_size``), so a generator effectively pulls: the trainer's
``send`` blocks until a generator has room, and the data position stays with the trainer.
ZeroMQ hands batches round-robin to the connected generators. Nothing here de-duplicates
batches: the trainer may send a batch holding a subset of an earlier batch's prompts again
(a re-issue, after a generator was lost or a batch went missing).

Rollouts, generator -> trainer: PUSH (generators connect) -> PULL (the trainer binds).

Per-sender order is kept (one ZeroMQ pipe per sender, one sending thread). The trainer
accepts a rollout only from a sender that completed the handshake in this run, through a
connection with the same ZAP User-Id (CURVE key) it joined with (``Roster.authenticate``),
and only within the size the config allows (``config.rollout_limits``); it drops duplicates:
a sequence number not above the sender's last one, or a (sender, prompt id, rollout id) seen
within the last ``dedup_window`` rollouts (keyed by prompt too, so that a re-issued subset of a
batch, whose prompts a generator may number from 0 again, is not taken for a repeat). Every drop is counted by reason (``unknown_sender``,
``forged_sender``, ``rollout_too_large``, ``duplicate``, ...).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import zmq

from rlhf_engine.data.samples import Sample
from rlhf_engine.transport.config import TransportConfig, prompt_limits, rollout_limits
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.errors import BackpressureTimeout
from rlhf_engine.transport.iothread import IoThread
from rlhf_engine.transport.messages import PromptBatch, sample_from_wire, sample_to_wire
from rlhf_engine.transport.roster import Roster
from rlhf_engine.transport.wire import Header, PromptsHeader, RolloutHeader, WireError, WireLimits, decode, encode

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


class PromptSender:
    """Trainer side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, sender_id: str, security: Security,
                 health=lambda: None) -> None:
        self._config = config
        self._sender_id = sender_id
        sock = open_socket(context, zmq.PUSH, channel_endpoint(config.endpoint, "prompts"), bind=True,
                           security=security, config=config, limits=prompt_limits(config), hwm=config.prompt_queue_size)
        self._channel = SendChannel("prompts-send", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, blocked_log_s=config.blocked_log_s, health=health)
        self._channel.start()

    def send(self, batch: PromptBatch, timeout_s: float | None = None) -> None:
        """Queue ``batch``; ``ValueError`` if it exceeds what generators accept (see ``prompt_limits``)."""
        config = self._config
        if len(batch.prompts) > config.max_batch_prompts:
            raise ValueError(f"batch {batch.batch_id} has {len(batch.prompts)} prompts; "
                             f"transport.max_batch_prompts is {config.max_batch_prompts}")
        longest = max((len(p) for p in batch.prompts), default=0)
        if longest > config.max_prompt_tokens:
            raise ValueError(f"batch {batch.batch_id} has a prompt of {longest} tokens; "
                             f"transport.max_prompt_tokens is {config.max_prompt_tokens}")
        timeout = config.send_timeout_s if timeout_s is None else timeout_s
        self._channel.send(lambda seq: batch.to_wire(self._sender_id, seq), timeout)

    @property
    def stats(self):
        return self._channel.stats

    def check(self) -> None:
        """Raise if the IO thread failed or the channel is closed."""
        self._channel.check()

    def close(self) -> bool:
        return self._channel.close()


class PromptReceiver:
    """Generator side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, security: Security) -> None:
        limits = prompt_limits(config)
        sock = open_socket(context, zmq.PULL, channel_endpoint(config.endpoint, "prompts"), bind=False,
                           security=security, config=config, limits=limits, hwm=config.prompt_queue_size)
        self._channel = RecvChannel("prompts-recv", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, limits=limits, accept=self._accept,
                                    drop_log_interval_s=config.drop_log_interval_s)
        self._channel.start()

    @staticmethod
    def _accept(header, tensors, user_id) -> PromptBatch:
        if not isinstance(header, PromptsHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the prompt channel")
        return PromptBatch.from_wire(header, tensors)

    def recv(self, timeout_s: float | None = None, health=lambda: None) -> PromptBatch | None:
        return self._channel.get(timeout_s, health)

    @property
    def stats(self):
        return self._channel.stats

    def close(self) -> bool:
        return self._channel.close()


DEDUP_WINDOW = 1 << 17


class RolloutSender:
    """Generator side. ``send`` blocks under back-pressure (see ``channel.py``)."""

    def __init__(self, context: zmq.Context, config: TransportConfig, sender_id: str, security: Security,
                 health=lambda: None) -> None:
        self._config = config
        self._sender_id = sender_id
        sock = open_socket(context, zmq.PUSH, channel_endpoint(config.endpoint, "rollouts"), bind=False,
                           security=security, config=config, limits=rollout_limits(config), hwm=config.rollout_hwm)
        self._channel = SendChannel(f"rollouts-send[{sender_id}]", sock, queue_size=config.rollout_queue_size,
                                    linger_ms=config.linger_ms, blocked_log_s=config.blocked_log_s, health=health)
        self._channel.start()

    def send(self, sample: Sample, timeout_s: float | None = None) -> None:
        """Queue one rollout; blocks while the trainer is behind (``BackpressureTimeout`` after the timeout)."""
        timeout = self._config.send_timeout_s if timeout_s is None else timeout_s
        self._channel.send(lambda seq: sample_to_wire(sample, self._sender_id, seq), timeout)

    def flush(self, timeout_s: float) -> bool:
        return self._channel.flush(timeout_s)

    @property
    def depth(self) -> int:
        return self._channel.depth

    @property
    def stats(self):
        return self._channel.stats

    def close(self) -> bool:
        return self._channel.close()


class RolloutReceiver:
    """Trainer side: validated, authenticated, de-duplicated rollouts from every generator, fair-queued."""

    def __init__(self, context: zmq.Context, config: TransportConfig, security: Security, roster: Roster,
                 dedup_window: int = DEDUP_WINDOW) -> None:
        self._config = config
        self._roster = roster
        self._last_seq: dict[str, int] = {}
        self._seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        self._dedup_window = dedup_window
        limits = rollout_limits(config)
        sock = open_socket(context, zmq.PULL, channel_endpoint(config.endpoint, "rollouts"), bind=True,
                           security=security, config=config, limits=limits, hwm=config.rollout_hwm)
        self._channel = RecvChannel("rollouts-recv", sock, queue_size=config.rollout_queue_size,
                                    queue_bytes=config.rollout_queue_bytes, linger_ms=config.linger_ms,
                                    limits=limits, accept=self._accept, drop_log_interval_s=config.drop_log_interval_s)
        self._channel.start()

    def _accept(self, header, tensors, user_id: str | None) -> Sample:  # runs on the IO thread
        if not isinstance(header, RolloutHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the rollout channel")
        refused = self._roster.authenticate(header.sender, user_id)
        if refused:
            raise WireError(refused, f"rollout {header.sample_id[:40]!r} claims sender {header.sender[:80]!r}, "
                                     f"connection user id {user_id!r}")
        sample = sample_from_wire(header, tensors, self._config.max_prompt_tokens, self._config.max_response_tokens)
        key = (header.sender, sample.prompt_id, sample.sample_id)
        if header.seq <= self._last_seq.get(header.sender, -1) or key in self._seen:
            raise WireError("duplicate", f"sample {sample.sample_id!r} (seq {header.seq}) from {header.sender!r}")
        self._last_seq[header.sender] = header.seq
        self._seen[key] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        return sample

    def recv(self, timeout_s: float | None = None, health=lambda: None) -> Sample | None:
        """The next rollout, or None after ``timeout_s`` (None = wait forever)."""
        return self._channel.get(timeout_s, health)

    @property
    def depth(self) -> int:
        return self._channel.depth

    @property
    def queued_bytes(self) -> int:
        return self._channel.queued_bytes

    @property
    def stats(self):
        return self._channel.stats

    def check(self) -> None:
        """Raise if the IO thread failed or the channel is closed."""
        self._channel.check()

    def close(self) -> bool:
        return self._channel.close()
