"""Control and weights: ROUTER (the trainer binds) <-> DEALER (each generator connects).

Handshake: a generator sends HELLO (protocol version, model fingerprint, hostname); the
trainer answers WELCOME or REJECT with the reason, and keeps the reason for its own
user (``HandshakeError`` on both sides). Both ends send HEARTBEAT every
``heartbeat_interval_s``; any message counts as a sign of life, and a peer silent for
``heartbeat_timeout_s`` is dead (``PeerDeadError``). SHUTDOWN says goodbye either way.

Weights: ``publish_weights`` sends one update to every live generator — through a
shared-memory buffer for generators on this host (header only over the socket), as
buckets of tensor frames otherwise. A generator hands an update to its user only when it
is complete (``WeightUpdate``), drops stale or repeated versions, and acknowledges each
version (taken or skipped) so that the trainer can reuse the buffer.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.errors import (
    BackpressureTimeout,
    HandshakeError,
    HandshakeTimeout,
    PeerDeadError,
    ShutdownRequested,
)
from rlhf_engine.transport.iothread import IoThread
from rlhf_engine.transport.messages import WeightUpdate
from rlhf_engine.transport.shm import ShmPool, ShmReader, layout
from rlhf_engine.transport.weights import Staging, bucketize
from rlhf_engine.transport.wire import (
    PROTOCOL_VERSION,
    HeartbeatHeader,
    HelloHeader,
    RejectHeader,
    ShutdownHeader,
    WeightsAckHeader,
    WeightsHeader,
    WelcomeHeader,
    WireError,
    check_specs,
    decode,
    encode,
    tensor_spec,
)

log = logging.getLogger(__name__)

_RECV_BURST = 64
_ACK_HISTORY = 16


@dataclass
class GeneratorInfo:
    sender_id: str
    hostname: str
    shm: bool
    identity: bytes
    last_seen: float
    state: str = "live"
    """``live``, ``dead`` (heartbeat timeout) or ``left`` (said goodbye)."""


class _Sent:
    """Counts the sends of one publish; keeps ZeroMQ's trackers of zero-copy frames."""

    def __init__(self, n: int) -> None:
        self.remaining = n
        self.trackers: list[zmq.MessageTracker] = []
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def one_sent(self, tracker: zmq.MessageTracker | None) -> None:
        if tracker is not None:
            self.trackers.append(tracker)
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


class _ControlThread(IoThread):
    """Shared loop: read bursts, send the outbox, heartbeat on time."""

    def __init__(self, name: str, sock: zmq.Socket, config: TransportConfig, sender_id: str) -> None:
        super().__init__(name, sock, config.linger_ms)
        self._config = config
        self.sender_id = sender_id
        self._seq = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()

    def _enqueue(self, route: list, frames: list, sent: _Sent | None = None) -> None:
        self._outbox.put((route, frames, sent))
        self.wake()

    def _send_now(self, route: list, frames: list, sent: _Sent | None) -> None:
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
            while True:
                try:
                    route, frames, sent = self._outbox.get_nowait()
                except queue.Empty:
                    break
                self._send_now(route, frames, sent)
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self._config.heartbeat_interval_s
        self._on_stop()

    def _header(self, cls, **fields):
        return cls(sender=self.sender_id, seq=next(self._seq), **fields)

    def _on_start(self) -> None:
        pass

    def _on_stop(self) -> None:
        pass

    def _handle(self, frames: list) -> None:
        raise NotImplementedError

    def _beat(self) -> None:
        raise NotImplementedError


class TrainerControl(_ControlThread):
    """Trainer side of the control channel: handshakes, liveness, weight publishing, acks."""

    def __init__(self, context: zmq.Context, config: TransportConfig, fingerprint: str, sender_id: str,
                 security: Security) -> None:
        sock = open_socket(context, zmq.ROUTER, channel_endpoint(config.endpoint, "control"), bind=True,
                           security=security, config=config, hwm=0)
        sock.router_mandatory = 1
        super().__init__("control-trainer", sock, config, sender_id)
        self.fingerprint = fingerprint
        self.hostname = socket.gethostname()
        self.rejections: list[str] = []
        self._peers: dict[bytes, GeneratorInfo] = {}
        self._cond = threading.Condition()
        self._acks: dict[int, dict[str, bool]] = {}
        self._published = -1
        self._shm_paths: dict[int, str] = {}
        self._pool = ShmPool(config.shm_dir, config.shm_buffers) if config.use_shm else None
        self.start()

    # ---- IO thread -----------------------------------------------------------
    def _handle(self, frames: list) -> None:
        if len(frames) < 2:
            raise WireError("frame_count", "no header after the routing id")
        identity = frames[0].bytes
        header, _ = decode(frames[1:], self._config.limits)
        now = time.monotonic()
        with self._cond:
            peer = self._peers.get(identity)
            if isinstance(header, HelloHeader):
                self._hello(identity, header, now)
            elif peer is None:
                raise WireError("unknown_peer", f"{type(header).__name__} from {header.sender!r} before its handshake")
            else:
                if peer.state == "dead":
                    log.warning("generator %s is alive again", peer.sender_id)
                    peer.state = "live"
                peer.last_seen = now
                if isinstance(header, WeightsAckHeader):
                    acks = self._acks.setdefault(header.weight_version, {})
                    acks[peer.sender_id] = header.applied
                    path = self._shm_paths.get(header.weight_version)
                    if self._pool is not None and path is not None:
                        self._pool.release(peer.sender_id, path)
                elif isinstance(header, ShutdownHeader):
                    peer.state = "left"
                    log.info("generator %s left (%s)", peer.sender_id, header.reason or "shutdown")
                    if self._pool is not None:
                        self._pool.release(peer.sender_id)
                elif not isinstance(header, HeartbeatHeader):
                    raise WireError("wrong_kind", f"{type(header).__name__} on the trainer's control channel")
            self._cond.notify_all()
        self.stats["received"] += 1

    def _hello(self, identity: bytes, hello: HelloHeader, now: float) -> None:
        if hello.version != PROTOCOL_VERSION:
            reason = (f"protocol version mismatch: generator {hello.sender!r} speaks v{hello.version}, "
                      f"trainer speaks v{PROTOCOL_VERSION}")
        elif hello.fingerprint != self.fingerprint:
            reason = (f"model fingerprint mismatch: generator {hello.sender!r} has {hello.fingerprint[:16]}..., "
                      f"trainer has {self.fingerprint[:16]}... (different parameter names, shapes or dtypes)")
        else:
            reason = ""
        if reason:
            log.error("handshake refused: %s", reason)
            self.rejections.append(reason)
            self._send_now([identity], encode(self._header(RejectHeader, reason=reason)), None)
            return
        shm = self._pool is not None and hello.shm and hello.hostname == self.hostname
        self._peers[identity] = GeneratorInfo(hello.sender, hello.hostname, shm, identity, now)
        log.info("generator %s connected from %s (weights via %s)", hello.sender, hello.hostname,
                 "shared memory" if shm else "socket frames")
        self._send_now([identity], encode(self._header(WelcomeHeader, shm=shm)), None)

    def _beat(self) -> None:
        now = time.monotonic()
        with self._cond:
            for peer in self._peers.values():
                if peer.state != "live":
                    continue
                if now - peer.last_seen > self._config.heartbeat_timeout_s:
                    peer.state = "dead"
                    log.error("generator %s is dead: no message for %.1f s (heartbeat_timeout_s=%s)",
                              peer.sender_id, now - peer.last_seen, self._config.heartbeat_timeout_s)
                    if self._pool is not None:
                        self._pool.release(peer.sender_id)
                    self._cond.notify_all()
                    continue
                self._send_now([peer.identity], encode(self._header(HeartbeatHeader)), None)

    def _on_stop(self) -> None:
        with self._cond:
            live = [p for p in self._peers.values() if p.state == "live"]
        for peer in live:  # orderly goodbye; linger bounds how long it may take
            self._send_now([peer.identity], encode(self._header(ShutdownHeader, reason="trainer closed")), None)

    # ---- user side -----------------------------------------------------------
    def generators(self, state: str | None = "live") -> list[GeneratorInfo]:
        with self._cond:
            return [p for p in self._peers.values() if state is None or p.state == state]

    def wait_for_generators(self, n: int, timeout_s: float) -> list[GeneratorInfo]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self.check()
                if self.rejections:
                    raise HandshakeError(self.rejections[-1])
                live = [p for p in self._peers.values() if p.state == "live"]
                if len(live) >= n:
                    return live
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandshakeTimeout(f"only {len(live)} of {n} generators connected to "
                                         f"{self._config.endpoint} within {timeout_s} s")
                self._cond.wait(min(left, 0.1))

    def raise_if_dead(self) -> None:
        dead = [p.sender_id for p in self.generators("dead")]
        if dead:
            raise PeerDeadError(f"generators {dead} sent nothing for {self._config.heartbeat_timeout_s} s")

    def publish_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        timeout_s: float) -> list[str]:
        """Send ``version`` to every live generator; returns their ids.

        Returns once the trainer's tensors are no longer referenced (copied into shared
        memory, or written to the sockets), so the caller may modify them afterwards.
        """
        self.check()
        if version <= self._published:
            raise ValueError(f"weight version {version} must be greater than the last published ({self._published})")
        named = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        specs = tuple(tensor_spec(name, t) for name, t in named)
        check_specs(specs, self._config.limits)
        peers = self.generators("live")
        shm_peers = [p for p in peers if p.shm]
        tcp_peers = [p for p in peers if not p.shm]
        if shm_peers:
            offsets, size = layout([s.nbytes for s in specs])
            segment = self._pool.acquire(size, timeout_s, {p.sender_id for p in shm_peers})
            segment.write([t for _, t in named], offsets)
            with self._cond:
                self._shm_paths[version] = segment.path
            frames = encode(self._header(WeightsHeader, tensors=specs, weight_version=version, bucket=0, num_buckets=1,
                                         shm_path=segment.path, shm_size=size, offsets=tuple(offsets)))
            for peer in shm_peers:
                self._enqueue([peer.identity], frames)
        if tcp_peers:
            buckets = bucketize(named, self._config.bucket_bytes)
            sent = _Sent(len(buckets) * len(tcp_peers))
            for i, bucket in enumerate(buckets):
                tensors = [t.detach() for _, t in bucket]
                header = self._header(WeightsHeader, tensors=tuple(tensor_spec(n, t) for n, t in bucket),
                                      weight_version=version, bucket=i, num_buckets=len(buckets))
                frames = encode(header, tensors)
                for peer in tcp_peers:
                    self._enqueue([peer.identity], frames, sent)
            self._wait_sent(sent, timeout_s, [p.sender_id for p in tcp_peers])
        self._published = version
        with self._cond:
            for old in [v for v in self._acks if v <= version - _ACK_HISTORY]:
                del self._acks[old]
            for old in [v for v in self._shm_paths if v <= version - _ACK_HISTORY]:
                del self._shm_paths[old]
        return [p.sender_id for p in peers]

    def _wait_sent(self, sent: _Sent, timeout_s: float, peers: list[str]) -> None:
        deadline = time.monotonic() + timeout_s
        while not sent.done.wait(0.1):
            self.check()
            if time.monotonic() > deadline:
                raise BackpressureTimeout(f"weight buckets not handed to the socket within {timeout_s} s")
        for tracker in sent.trackers:
            try:
                tracker.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                raise BackpressureTimeout(f"weight update still unsent after {timeout_s} s: generators {peers} "
                                          "are not reading") from None

    def wait_for_acks(self, version: int, timeout_s: float, peers: Iterable[str] | None = None) -> dict[str, bool]:
        """Wait until each of ``peers`` (default: the live generators) acked ``version``.

        Returns ``{generator_id: applied}``; raises ``PeerDeadError`` if one of them dies
        and ``TimeoutError`` after ``timeout_s``.
        """
        wanted = set(peers) if peers is not None else {p.sender_id for p in self.generators("live")}
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self.check()
                acks = self._acks.get(version, {})
                if wanted <= acks.keys():
                    return {p: acks[p] for p in wanted}
                gone = {p.sender_id for p in self._peers.values() if p.state != "live"} & (wanted - acks.keys())
                if gone:
                    raise PeerDeadError(f"generators {sorted(gone)} died or left before acking weight version {version}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"weight version {version}: no ack from {sorted(wanted - acks.keys())} "
                                       f"within {timeout_s} s")
                self._cond.wait(min(left, 0.1))

    def shutdown_generators(self, reason: str = "trainer shutdown") -> None:
        for peer in self.generators("live"):
            self._enqueue([peer.identity], encode(self._header(ShutdownHeader, reason=reason)))

    def close(self, join_timeout_s: float = 1.0) -> bool:
        stopped = super().close(join_timeout_s)
        if self._pool is not None:
            self._pool.close()
        return stopped


class GeneratorControl(_ControlThread):
    """Generator side: handshake in the constructor, then liveness, complete weight updates, acks."""

    def __init__(self, context: zmq.Context, config: TransportConfig, fingerprint: str, sender_id: str,
                 security: Security, *, protocol_version: int = PROTOCOL_VERSION) -> None:
        sock = open_socket(context, zmq.DEALER, channel_endpoint(config.endpoint, "control"), bind=False,
                           security=security, config=config, hwm=0)
        super().__init__(f"control-generator[{sender_id}]", sock, config, sender_id)
        self.fingerprint = fingerprint
        self.shm = False
        """Weights arrive through shared memory (decided by the trainer at the handshake)."""
        self._protocol_version = protocol_version
        self._answered = threading.Event()
        self._reject_reason: str | None = None
        self._last_seen = time.monotonic()
        self._shutdown = threading.Event()
        self._shutdown_reason = ""
        self._cond = threading.Condition()
        self._pending: WeightUpdate | None = None
        self._newest = -1
        self.current_version = -1
        """Version of the last update handed to the user (-1: none yet)."""
        self._staging = Staging(max_buckets=config.limits.max_tensors)
        self._reader = ShmReader(config.shm_dir, config.shm_buffers + 1)
        self.start()
        self._wait_for_answer()

    def _wait_for_answer(self) -> None:
        deadline = time.monotonic() + self._config.handshake_timeout_s
        while not self._answered.wait(0.05):
            self.check()
            if time.monotonic() > deadline:
                self.close()
                raise HandshakeTimeout(f"no handshake answer from the trainer at {self._config.endpoint} "
                                     f"within {self._config.handshake_timeout_s} s")
        if self._reject_reason is not None:
            self.close()
            raise HandshakeError(f"trainer refused the handshake: {self._reject_reason}")

    # ---- IO thread -----------------------------------------------------------
    def _on_start(self) -> None:
        hello = HelloHeader(version=self._protocol_version, sender=self.sender_id, seq=next(self._seq),
                            fingerprint=self.fingerprint, hostname=socket.gethostname(), shm=self._config.use_shm)
        self._send_now([], encode(hello), None)

    def _on_stop(self) -> None:
        if self._answered.is_set() and self._reject_reason is None:
            self._send_now([], encode(self._header(ShutdownHeader, reason="generator closed")), None)

    def _beat(self) -> None:
        if self._answered.is_set():
            self._send_now([], encode(self._header(HeartbeatHeader)), None)

    def _handle(self, frames: list) -> None:
        header, tensors = decode(frames, self._config.limits)
        self._last_seen = time.monotonic()
        self.stats["received"] += 1
        if isinstance(header, WelcomeHeader):
            self.shm = header.shm
            self._answered.set()
        elif isinstance(header, RejectHeader):
            self._reject_reason = header.reason
            self._answered.set()
        elif isinstance(header, WeightsHeader):
            self._weights(header, tensors)
        elif isinstance(header, ShutdownHeader):
            self._shutdown_reason = header.reason
            self._shutdown.set()
        elif not isinstance(header, HeartbeatHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the generator's control channel")

    def _weights(self, header: WeightsHeader, tensors: list[torch.Tensor]) -> None:
        if header.weight_version <= self._newest or header.weight_version < self._staging.version:
            self.stats["stale_weights"] += 1
            log.info("ignoring weight version %d (have %d)", header.weight_version, self._newest)
            if header.shm_path:
                self._send_ack(header.weight_version, False)
            return
        if header.shm_path:
            dtypes = check_specs(header.tensors, self._config.limits)
            views = self._reader.view(header.shm_path, header.shm_size, header.tensors, dtypes, header.offsets)
            complete = {s.name: t for s, t in zip(header.tensors, views)}
            if len(complete) != len(header.tensors):
                raise WireError("bad_bucket", f"version {header.weight_version}: repeated tensor names")
        else:
            complete = self._staging.add(header, tensors)
            if complete is None:
                return
        version = header.weight_version
        update = WeightUpdate(version, complete, _ack=lambda applied: self._send_ack(version, applied))
        with self._cond:
            skipped, self._pending, self._newest = self._pending, update, version
            self._cond.notify_all()
        if skipped is not None:  # never handed over: a newer one replaces it
            skipped.ack(applied=False)

    def _send_ack(self, version: int, applied: bool) -> None:
        self._enqueue([], encode(self._header(WeightsAckHeader, weight_version=version, applied=applied)))

    # ---- user side -----------------------------------------------------------
    def health(self) -> None:
        """Raise ``ShutdownRequested`` / ``PeerDeadError`` / the IO thread's failure, if any."""
        self.check()
        if self._shutdown.is_set():
            raise ShutdownRequested(f"trainer asked to shut down: {self._shutdown_reason or 'no reason given'}")
        silent = time.monotonic() - self._last_seen
        if silent > self._config.heartbeat_timeout_s:
            raise PeerDeadError(f"trainer at {self._config.endpoint} sent nothing for {silent:.1f} s "
                                f"(heartbeat_timeout_s={self._config.heartbeat_timeout_s})")

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def poll_weights(self) -> WeightUpdate | None:
        """The newest complete update not yet handed over, or None. Call ``update.ack()`` after use."""
        with self._cond:
            update, self._pending = self._pending, None
        if update is not None:
            self.current_version = update.version
        return update

    def wait_weights(self, min_version: int, timeout_s: float | None) -> WeightUpdate | None:
        """Wait until an update of at least ``min_version`` can be handed over; None if the
        user already has one (``current_version >= min_version``). ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._pending is not None and self._pending.version >= min_version:
                    break
                if self._pending is None and self.current_version >= min_version:
                    return None
                self._cond.release()
                try:
                    self.health()
                finally:
                    self._cond.acquire()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no weight version >= {min_version} within {timeout_s} s "
                                       f"(newest received: {self._newest})")
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        return self.poll_weights()

    def close(self, join_timeout_s: float = 1.0) -> bool:
        stopped = super().close(join_timeout_s)
        self._reader.close()
        return stopped
