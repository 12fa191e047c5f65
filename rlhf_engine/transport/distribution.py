"""Weight distribution over the control channel: the trainer publishes, generators take and ack.

``WeightPublisher`` sends one update to every live generator — through a shared-memory
buffer for generators on this host (header only over the socket), as buckets of tensor
frames otherwise — and collects the acks that let it reuse a buffer. ``WeightReceiver``
hands an update to its user only when it is complete (``WeightUpdate``), drops stale or
repeated versions, checks every tensor against the model's specs when it knows them, and
acknowledges each version (taken or skipped).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Mapping

import torch
import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.control import ControlThread
from rlhf_engine.transport.errors import BackpressureTimeout
from rlhf_engine.transport.limits import WeightSpecs
from rlhf_engine.transport.messages import WeightUpdate
from rlhf_engine.transport.roster import GeneratorInfo, Roster
from rlhf_engine.transport.shm import ShmPool, ShmReader, layout
from rlhf_engine.transport.weights import Staging, bucketize
from rlhf_engine.transport.wire import WeightsAckHeader, WeightsHeader, WireError, WireLimits, check_specs, encode, tensor_spec

log = logging.getLogger(__name__)

_ACK_HISTORY = 16


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


class WeightPublisher:
    """Trainer side. Acks and roster changes are waited for on ``roster.cond``."""

    def __init__(self, control: ControlThread, config: TransportConfig, roster: Roster,
                 specs: WeightSpecs | None) -> None:
        self._control = control
        self._config = config
        self._roster = roster
        self._specs = specs
        self._acks: dict[int, dict[str, bool]] = {}
        self._published = -1
        self._shm_paths: dict[int, str] = {}
        self._pool = ShmPool(config.shm_dir, config.shm_buffers) if config.use_shm else None

    @property
    def shm(self) -> bool:
        return self._pool is not None

    # ---- IO thread -----------------------------------------------------------
    def on_ack(self, peer: GeneratorInfo, ack: WeightsAckHeader) -> None:
        with self._roster.cond:
            self._acks.setdefault(ack.weight_version, {})[peer.name] = ack.applied
            path = self._shm_paths.get(ack.weight_version)
            self._roster.cond.notify_all()
        if self._pool is not None and path is not None:
            self._pool.release(peer.name, path)

    def forget(self, peer: GeneratorInfo) -> None:
        """``peer`` was lost or left: it holds no buffer any more."""
        if self._pool is not None:
            self._pool.release(peer.name)

    # ---- user side -----------------------------------------------------------
    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                timeout_s: float) -> list[str]:
        """Send ``version`` to every live generator; returns their names. Returns once the trainer's
        tensors are no longer referenced (copied into shared memory, or written to the sockets)."""
        self._control.check()
        if version <= self._published:
            raise ValueError(f"weight version {version} must be greater than the last published ({self._published})")
        named = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        specs = tuple(tensor_spec(name, t) for name, t in named)
        if self._specs is not None:
            self._specs.check_published(specs)
        check_specs(specs, WireLimits())
        peers = self._roster.live()
        shm_peers = [p for p in peers if p.shm]
        tcp_peers = [p for p in peers if not p.shm]
        header = self._control.header
        if shm_peers:
            offsets, size = layout([s.nbytes for s in specs])
            segment = self._pool.acquire(size, timeout_s, {p.name for p in shm_peers})
            # a generator lost (and forgotten) while acquire waited must not hold the new buffer: the roster
            # drops a peer before forgetting it, so one lost after this line is released by `forget`
            self._pool.retain(segment, {p.name for p in self._roster.live()})
            segment.write([t for _, t in named], offsets)
            with self._roster.cond:
                self._shm_paths[version] = segment.path
            frames = encode(header(WeightsHeader, tensors=specs, weight_version=version, bucket=0, num_buckets=1,
                                   shm_path=segment.path, shm_size=size, offsets=tuple(offsets)))
            for peer in shm_peers:
                self._control.enqueue([peer.identity], frames)
        if tcp_peers:
            buckets = bucketize(named, self._config.bucket_bytes)
            sent = _Sent(len(buckets) * len(tcp_peers))
            for i, bucket in enumerate(buckets):
                tensors = [t.detach() for _, t in bucket]
                frames = encode(header(WeightsHeader, tensors=tuple(tensor_spec(n, t) for n, t in bucket),
                                       weight_version=version, bucket=i, num_buckets=len(buckets)), tensors)
                for peer in tcp_peers:
                    self._control.enqueue([peer.identity], frames, sent)
            self._wait_sent(sent, timeout_s, [p.name for p in tcp_peers])
        self._published = version
        with self._roster.cond:
            for old in [v for v in self._acks if v <= version - _ACK_HISTORY]:
                del self._acks[old]
            for old in [v for v in self._shm_paths if v <= version - _ACK_HISTORY]:
                del self._shm_paths[old]
        return [p.name for p in peers]

    def _wait_sent(self, sent: _Sent, timeout_s: float, peers: list[str]) -> None:
        deadline = time.monotonic() + timeout_s
        while not sent.done.wait(0.1):
            self._control.check()
            if time.monotonic() > deadline:
                raise BackpressureTimeout(f"weight buckets not handed to the socket within {timeout_s} s")
        for tracker in sent.trackers:
            try:
                tracker.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                raise BackpressureTimeout(f"weight update still unsent after {timeout_s} s: generators {peers} "
                                          "are not reading") from None

    def wait_for_acks(self, version: int, timeout_s: float, peers: Iterable[str] | None = None) -> dict[str, bool]:
        """Wait until each of ``peers`` (default: the live generators) acked ``version`` or was lost.

        Returns ``{name: applied}`` of those that acked (a generator lost or gone before acking is
        left out: the roster reports it); ``TimeoutError`` after ``timeout_s``.
        """
        wanted = set(peers) if peers is not None else {p.name for p in self._roster.live()}

        def settled():
            acks = self._acks.get(version, {})
            live = {p.name for p in self._roster.live()}
            waiting = {p for p in wanted - acks.keys() if p in live}
            return None if waiting else {p: acks[p] for p in wanted if p in acks}

        result = self._roster.wait(settled, timeout_s, self._control.check)
        if result is None:
            with self._roster.cond:
                missing = sorted(wanted - self._acks.get(version, {}).keys())
            raise TimeoutError(f"weight version {version}: no ack from {missing} within {timeout_s} s")
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


class WeightReceiver:
    """Generator side: complete, checked updates handed over one at a time; acks sent through ``send_ack``."""

    def __init__(self, config: TransportConfig, specs: WeightSpecs | None, limits: WireLimits,
                 send_ack: Callable[[int, bool], None]) -> None:
        self._specs = specs
        self._limits = limits
        self._send_ack = send_ack
        self._cond = threading.Condition()
        self._pending: WeightUpdate | None = None
        self.newest = -1
        self.current_version = -1
        """Version of the last update handed to the user (-1: none yet)."""
        self._staging = Staging(max_buckets=max(limits.max_tensors, 1))
        self._reader = ShmReader(config.shm_dir, config.shm_buffers + 1)

    # ---- IO thread -----------------------------------------------------------
    def on_weights(self, header: WeightsHeader, tensors: list[torch.Tensor]) -> bool:
        """Take one weights message; False when it was a stale or repeated version."""
        if self._specs is not None:
            self._specs.check_received(header.tensors)
        if header.weight_version <= self.newest or header.weight_version < self._staging.version:
            log.info("ignoring weight version %d (have %d)", header.weight_version, self.newest)
            if header.shm_path:
                self._send_ack(header.weight_version, False)
            return False
        if header.shm_path:
            dtypes = check_specs(header.tensors, self._limits)
            views = self._reader.view(header.shm_path, header.shm_size, header.tensors, dtypes, header.offsets)
            complete = {s.name: t for s, t in zip(header.tensors, views)}
            if len(complete) != len(header.tensors):
                raise WireError("bad_bucket", f"version {header.weight_version}: repeated tensor names")
        else:
            complete = self._staging.add(header, tensors)
            if complete is None:
                return True
        if self._specs is not None and len(complete) != len(self._specs.tensors):
            raise WireError("bad_weights", f"version {header.weight_version} has {len(complete)} tensors, "
                                           f"the model {len(self._specs.tensors)}")
        version = header.weight_version
        update = WeightUpdate(version, complete, _ack=lambda applied: self._send_ack(version, applied))
        with self._cond:
            skipped, self._pending, self.newest = self._pending, update, version
            self._cond.notify_all()
        if skipped is not None:  # never handed over: a newer one replaces it
            skipped.ack(applied=False)
        return True

    # ---- user side -----------------------------------------------------------
    def poll(self) -> WeightUpdate | None:
        """The newest complete update not yet handed over, or None. Call ``update.ack()`` after use."""
        with self._cond:
            update, self._pending = self._pending, None
        if update is not None:
            self.current_version = update.version
        return update

    def wait(self, min_version: int, timeout_s: float | None, health: Callable[[], None]) -> WeightUpdate | None:
        """Wait until an update of at least ``min_version`` can be handed over; None if the user
        already has one (``current_version >= min_version``). ``TimeoutError`` after ``timeout_s``;
        ``health()`` runs (outside the lock) every 0.1 s and may raise."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            health()
            with self._cond:
                if self._pending is not None and self._pending.version >= min_version:
                    break
                if self._pending is None and self.current_version >= min_version:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no weight version >= {min_version} within {timeout_s} s "
                                       f"(newest received: {self.newest})")
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        return self.poll()

    def close(self) -> None:
        self._reader.close()
