"""The session on the control channel: handshake, heartbeats, roster, goodbye.

Handshake: a generator sends HELLO (protocol version, model fingerprint, hostname); the
trainer answers WELCOME or REJECT with the reason, and keeps the reason for its own user
(``HandshakeError`` on both sides). With CURVE, a generator whose key the trainer's ZAP
handler refuses learns it from ZeroMQ's handshake event: ``AuthenticationFailed``
("authentication failed") instead of a handshake timeout.

Both ends send HEARTBEAT every ``heartbeat_interval_s``; any message counts as a sign of
life. A generator silent for ``heartbeat_timeout_s`` is dropped from the trainer's roster
(told so with a SHUTDOWN, in case it still listens) — never an error on the trainer's side;
a trainer silent that long is ``PeerDeadError`` on the generator's. SHUTDOWN says goodbye
either way. Weight messages are handed to ``distribution.py`` (``WeightPublisher`` on the trainer,
``WeightReceiver`` on the generator).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from rlhf_engine.transport.channel import frame_user_id
from rlhf_engine.transport.config import CONTROL_LIMITS, TransportConfig
from rlhf_engine.transport.distribution import WeightPublisher, WeightReceiver
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.errors import (
    AuthenticationFailed,
    HandshakeError,
    HandshakeTimeout,
    PeerDeadError,
    ShutdownRequested,
)
from rlhf_engine.transport.iothread import ControlThread
from rlhf_engine.transport.roster import LEFT, GeneratorInfo, Roster
from rlhf_engine.transport.weights import WeightSpecs
from rlhf_engine.transport.wire import (
    PROTOCOL_VERSION,
    HeartbeatHeader,
    HelloHeader,
    RejectHeader,
    ShutdownHeader,
    WeightsAckHeader,
    WeightsHeader,
    WeightsRelayedHeader,
    WeightsReleaseHeader,
    WelcomeHeader,
    WireError,
    WireLimits,
    decode,
    encode,
)

log = logging.getLogger(__name__)

_MAX_REJECTIONS = 64
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class TrainerControl(ControlThread):
    """Trainer side: handshakes, liveness and the roster; weights through ``self.weights``."""

    def __init__(self, context: zmq.Context, config: TransportConfig, fingerprint: str, sender_id: str,
                 security: Security, roster: Roster, weight_specs: WeightSpecs | None = None) -> None:
        sock = open_socket(context, zmq.ROUTER, channel_endpoint(config.endpoint, "control"), bind=True,
                           security=security, config=config, limits=CONTROL_LIMITS, hwm=0)
        sock.router_mandatory = 1
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) if security.curve else None
        super().__init__("control-trainer", sock, config, sender_id)
        self.fingerprint = fingerprint
        self.hostname = socket.gethostname()
        self.rejections: collections.deque[str] = collections.deque(maxlen=_MAX_REJECTIONS)
        """Reasons of the latest refused handshakes (a peer flooding HELLOs cannot grow it)."""
        self.roster = roster
        self.weights = WeightPublisher(self, config, roster, weight_specs)
        self.start()

    # ---- IO thread -----------------------------------------------------------
    def _handle(self, frames: list) -> None:
        if len(frames) < 2:
            raise WireError("frame_count", "no header after the routing id")
        identity = frames[0].bytes
        header, _ = decode(frames[1:], CONTROL_LIMITS)
        self.stats["received"] += 1
        if isinstance(header, HelloHeader):
            self._hello(identity, header, frame_user_id(frames[1]))
            return
        peer = self.roster.seen(identity)
        if peer is None:  # e.g. lost, or its connection was re-made: it must join again
            # a dropped generator may speak before it has read why: it is told that again, else no session
            reason = self.roster.removal_reason(identity) or "no session: not in the roster"
            self.send_now([identity], encode(self.header(ShutdownHeader, reason=reason)))
            raise WireError("unknown_peer", f"{type(header).__name__} from {header.sender!r} outside a session")
        if isinstance(header, WeightsAckHeader):
            self.weights.on_ack(peer, header)
        elif isinstance(header, WeightsRelayedHeader):
            self.weights.on_relayed(peer, header)
        elif isinstance(header, ShutdownHeader):
            self.roster.remove(identity, LEFT)
            self.weights.forget(peer)
            log.info("generator %s left (%s)", peer.name, header.reason or "shutdown")
        elif not isinstance(header, HeartbeatHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the trainer's control channel")

    def _hello(self, identity: bytes, hello: HelloHeader, user_id: str | None) -> None:
        if hello.version != PROTOCOL_VERSION:
            reason = (f"protocol version mismatch: generator {hello.sender!r} speaks v{hello.version}, "
                      f"trainer speaks v{PROTOCOL_VERSION}")
        elif hello.fingerprint != self.fingerprint:
            reason = (f"model fingerprint mismatch: generator {hello.sender!r} has {hello.fingerprint[:16]}..., "
                      f"trainer has {self.fingerprint[:16]}... (different parameter names, shapes or dtypes)")
        else:
            shm = self.weights.shm and hello.shm and hello.hostname == self.hostname
            reason = self.roster.join(identity, hello.sender, hello.hostname, shm, user_id, host_shm=hello.shm)
        if reason:
            self._drop("handshake_refused", reason)  # counted; logged rate-limited
            with self.roster.cond:
                self.rejections.append(reason)
                self.roster.cond.notify_all()
            self.send_now([identity], encode(self.header(RejectHeader, reason=reason)))
            return
        log.info("generator %s connected from %s (weights via %s)", hello.sender, hello.hostname,
                 "shared memory" if shm else "socket frames")
        self.send_now([identity], encode(self.header(WelcomeHeader, shm=shm)))
        peer = self.roster.seen(identity)
        if peer is not None:
            self.weights.on_join(peer)

    def _beat(self) -> None:
        timeout = self.config.heartbeat_timeout_s
        reason = f"dropped from the roster: silent for more than {timeout} s"
        for peer in self.roster.expire(timeout, reason):
            log.warning("generator %s lost: no message for more than %.1f s (heartbeat_timeout_s); dropped from "
                        "the roster", peer.name, timeout)
            self.weights.forget(peer)
            self.send_now([peer.identity], encode(self.header(ShutdownHeader, reason=reason)))
        for peer in self.roster.live():
            self.send_now([peer.identity], encode(self.header(HeartbeatHeader)))

    def _after_poll(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            self._drop("auth_failed", f"a client's CURVE key is not in the keys folder (ZAP status {event['value']})")

    def _on_stop(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        for peer in self.roster.live():  # orderly goodbye; linger bounds how long it may take
            self.send_now([peer.identity], encode(self.header(ShutdownHeader, reason="trainer closed")))

    # ---- user side -----------------------------------------------------------
    def wait_for_generators(self, n: int, timeout_s: float) -> list[GeneratorInfo]:
        def ready():
            if self.rejections:
                raise HandshakeError(self.rejections[-1])
            live = self.roster.live()
            return live if len(live) >= n else None

        live = self.roster.wait(ready, timeout_s, self.check)
        if live is None:
            raise HandshakeTimeout(f"only {len(self.roster.live())} of {n} generators connected to "
                                   f"{self.config.endpoint} within {timeout_s} s")
        return live

    def refused(self) -> list[str]:
        """Reasons of the latest refused handshakes, oldest first."""
        with self.roster.cond:
            return list(self.rejections)

    def shutdown_generators(self, reason: str = "trainer shutdown") -> None:
        for peer in self.roster.live():
            self.enqueue([peer.identity], encode(self.header(ShutdownHeader, reason=reason)))

    def close(self, join_timeout_s: float = 1.0) -> bool:
        stopped = super().close(join_timeout_s)
        self.weights.close()
        return stopped


class GeneratorControl(ControlThread):
    """Generator side: handshake in the constructor, then liveness; complete weight updates
    through ``self.weights``."""

    def __init__(self, context: zmq.Context, config: TransportConfig, fingerprint: str, sender_id: str,
                 security: Security, *, weight_specs: WeightSpecs | None = None,
                 protocol_version: int = PROTOCOL_VERSION) -> None:
        limits = weight_specs.limits(config.bucket_bytes) if weight_specs is not None else WireLimits()
        self._limits = limits
        sock = open_socket(context, zmq.DEALER, channel_endpoint(config.endpoint, "control"), bind=False,
                           security=security, config=config, limits=limits, hwm=0)
        self._monitoring = security.curve
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS) if security.curve else None
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
        self.weights = WeightReceiver(config, weight_specs, limits, self._send)
        self.start()
        self._wait_for_answer()

    def _wait_for_answer(self) -> None:
        deadline = time.monotonic() + self.config.handshake_timeout_s
        failure = ""
        try:
            while not self._answered.wait(0.05):
                self.check()
                failure = self._handshake_failure() or failure
                if failure.startswith("authentication failed"):
                    raise AuthenticationFailed(f"{failure} by the trainer at {self.config.endpoint}")
                if time.monotonic() > deadline:
                    raise HandshakeTimeout(f"no handshake answer from the trainer at {self.config.endpoint} "
                                           f"within {self.config.handshake_timeout_s} s{failure}")
            if self._reject_reason is not None:
                raise HandshakeError(f"trainer refused the handshake: {self._reject_reason}")
        except BaseException:
            self.close()
            raise
        self._close_monitor()

    def _handshake_failure(self) -> str:
        """What ZeroMQ's handshake events say about a CURVE failure, or ""."""
        if self._monitor is None or not self._monitor.poll(0):
            return ""
        event = recv_monitor_message(self._monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"authentication failed: the trainer refused this generator's CURVE key (ZAP status "
                    f"{event['value']}); its public key must be in the trainer's keys folder")
        return (f" (ZeroMQ handshake failed: {zmq.Event(event['event']).name}; CURVE keys on one side only, "
                f"or a wrong server key?)")

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    # ---- IO thread -----------------------------------------------------------
    def _on_start(self) -> None:
        hello = HelloHeader(version=self._protocol_version, sender=self.sender_id, seq=next(self._seq),
                            fingerprint=self.fingerprint, hostname=socket.gethostname(), shm=self.config.generator_shm)
        self.send_now([], encode(hello))

    def _on_stop(self) -> None:
        if self._answered.is_set() and self._reject_reason is None:
            self.send_now([], encode(self.header(ShutdownHeader, reason="generator closed")))

    def _beat(self) -> None:
        if self._answered.is_set():
            self.send_now([], encode(self.header(HeartbeatHeader)))

    def _handle(self, frames: list) -> None:
        header, tensors = decode(frames, self._limits)
        self._last_seen = time.monotonic()
        self.stats["received"] += 1
        if isinstance(header, (WelcomeHeader, RejectHeader)) and self._monitoring:
            self._sock.disable_monitor()  # answered: later events would have no reader
            self._monitoring = False
        if isinstance(header, WelcomeHeader):
            self.shm = header.shm
            self._answered.set()
        elif isinstance(header, RejectHeader):
            self._reject_reason = header.reason
            self._answered.set()
        elif isinstance(header, WeightsHeader):
            if not self.weights.on_weights(header, tensors):
                self.stats["stale_weights"] += 1
        elif isinstance(header, WeightsReleaseHeader):
            self.weights.on_release(header)
        elif isinstance(header, ShutdownHeader):
            self._shutdown_reason = header.reason
            self._shutdown.set()
        elif not isinstance(header, HeartbeatHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the generator's control channel")

    def _send(self, cls, **fields) -> None:
        """Send the trainer a header of type ``cls`` (from any thread)."""
        self.enqueue([], encode(self.header(cls, **fields)))

    # ---- user side -----------------------------------------------------------
    def health(self) -> None:
        """Raise ``ShutdownRequested`` / ``PeerDeadError`` / the IO thread's failure, if any."""
        self.check()
        if self._shutdown.is_set():
            raise ShutdownRequested(f"trainer asked to shut down: {self._shutdown_reason or 'no reason given'}")
        silent = time.monotonic() - self._last_seen
        if silent > self.config.heartbeat_timeout_s:
            raise PeerDeadError(f"trainer at {self.config.endpoint} sent nothing for {silent:.1f} s "
                                f"(heartbeat_timeout_s={self.config.heartbeat_timeout_s})")

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def close(self, join_timeout_s: float = 1.0) -> bool:
        self._close_monitor()
        stopped = super().close(join_timeout_s)
        self.weights.close()
        return stopped
