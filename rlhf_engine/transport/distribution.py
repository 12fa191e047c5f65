"""Weight distribution over the control channel, both ends: publish, catch up and collect acks (trainer,
``WeightPublisher``); complete, checked updates handed to the user one at a time (generator, ``WeightReceiver``).

``WeightPublisher`` sends one update to every live generator — through a shared-memory
buffer for generators on this host (header only over the socket), as buckets of tensor
frames otherwise — and collects the acks that let it reuse a buffer. A generator that joins
later gets the newest update at once: from its shared-memory buffer, which stays intact until
no other buffer is free (``on_join``), or over socket frames when the user hands the same
tensors again (``catch_up``: no second copy of the model is kept). One that still holds the
oldest buffer when a publish has waited ``timeout_s`` for a free one (it never acks) is dropped
from the roster (state ``unacked``) and told to shut down: the run goes on with the others.
Generators on frames that share a host get one copy per host, relayed by one of them through its
shared memory (``relay.py``). The generator's side is ``WeightReceiver``:

``WeightReceiver`` hands an update to its user only when it is complete (``WeightUpdate``), drops
stale or repeated versions, checks every tensor against the model's specs when it knows them, and
acknowledges each version (taken or skipped). An update from shared memory whose file fails its
checks is acked as ``refused``: a relay leader's file, and the trainer sends it frames instead; the
trainer's own file, and the trainer drops this generator (state ``refused``: shared memory does not work
for it, likely a ``shm_dir`` that is not the trainer's). When the trainer marks an
update ``relay``, this generator leads its host's relay (``relay.py``): it copies the update into a
shared-memory file of its own for its peers and hands its user views of that file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.errors import BackpressureTimeout
from rlhf_engine.transport.iothread import ControlThread
from rlhf_engine.transport.messages import WeightUpdate
from rlhf_engine.transport.relay import RelayLeader, RelayRounds
from rlhf_engine.transport.roster import REFUSED, UNACKED, GeneratorInfo, Roster
from rlhf_engine.transport.shm import BuffersHeld, Segment, ShmPool, ShmReader, layout
from rlhf_engine.transport.weights import Staging, WeightSpecs, bucketize
from rlhf_engine.transport.wire import (
    ShutdownHeader,
    TensorSpec,
    WeightsAckHeader,
    WeightsHeader,
    WeightsRelayedHeader,
    WeightsReleaseHeader,
    WireError,
    WireLimits,
    check_specs,
    encode,
    tensor_spec,
)

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


@dataclass
class _NewestInShm:
    """The newest update in shared memory, for generators that join after it was sent."""

    segment: Segment
    fields: dict
    """Its ``WeightsHeader`` fields (all but sender and seq)."""


class WeightPublisher:
    """Trainer side. Acks and roster changes are waited for on ``roster.cond``; ``_lock`` orders a
    publish's sending against a joining generator's catch-up (each gets the newest update once)."""

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
        self._lock = threading.Lock()
        self._newest_shm: _NewestInShm | None = None
        self._recipients: set[str] = set()
        """Generators that were sent the newest version (each once)."""
        self._relay = RelayRounds(control, config.relay)

    @property
    def shm(self) -> bool:
        return self._pool is not None

    # ---- IO thread -----------------------------------------------------------
    def on_ack(self, peer: GeneratorInfo, ack: WeightsAckHeader) -> None:
        with self._lock:
            leader = self._relay.refused(peer.name, ack.weight_version) if ack.refused else None
            if leader is not None:
                self._recipients.discard(peer.name)  # left to the catch-up (frames)
            elif not ack.refused:
                self._relay.acked(peer.name, ack.weight_version)  # releases the leader's file before the next publish
        if ack.refused:
            if leader is None:  # the trainer's own file: shared memory does not work for it, nothing else would
                self._drop({peer.name}, REFUSED, "dropped from the roster: it refused the trainer's shared-memory "
                                                 f"file of weight version {ack.weight_version}")
            raise WireError("bad_relay" if leader else "refused_weights",
                            f"generator {peer.name} refused the shared-memory file of weight version {ack.weight_version}"
                            + (f" relayed by {leader}: it gets frames, and {leader} relays no more" if leader else ""))
        with self._roster.cond:
            self._acks.setdefault(ack.weight_version, {})[peer.name] = ack.applied
            path = self._shm_paths.get(ack.weight_version)
            self._roster.cond.notify_all()
        if self._pool is not None and path is not None:
            self._pool.release(peer.name, path)

    def on_relayed(self, peer: GeneratorInfo, header: WeightsRelayedHeader) -> None:
        """A relay leader's answer: its host's other generators are sent the update from its file."""
        with self._lock:
            self._recipients.update(self._relay.relayed(peer, header))

    def forget(self, peer: GeneratorInfo) -> None:
        """``peer`` was lost or left: it holds no buffer any more."""
        self._forget(peer.name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._recipients.discard(name)  # a new session of it is sent the newest again
            self._relay.forget(name)
        if self._pool is not None:
            self._pool.release(name)

    def on_join(self, peer: GeneratorInfo) -> None:
        """``peer`` completed its handshake: send it the newest update in shared memory, if any, so that it
        can sample without waiting for the next publish (one being written now reaches it anyway)."""
        if self._pool is None or not peer.shm:
            return
        with self._lock:
            newest = self._newest_shm
            if newest is None or peer.name in self._recipients or not self._pool.hold(newest.segment, peer.name):
                return
            self._recipients.add(peer.name)
            self._control.send_now([peer.identity], encode(self._control.header(WeightsHeader, **newest.fields)))
        log.info("generator %s joined after weight version %d: sent it that version from shared memory", peer.name,
                 newest.fields["weight_version"])

    # ---- user side -----------------------------------------------------------
    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                timeout_s: float) -> list[str]:
        """Send ``version`` to every live generator; returns their names. Returns once the trainer's
        tensors are no longer referenced (copied into shared memory, or written to the sockets).

        With shared memory and the model's specs known, the tensors are taken one at a time and each is
        copied into the buffer as it comes: an iterator that makes each on demand (gathered from shards)
        never has a second full copy of the model alive; socket frames are then sent from the buffer.
        Generators on frames that share a host get them once, through one of them (``relay.py``); their
        names are returned too."""
        self._control.check()
        if version <= self._published:
            raise ValueError(f"weight version {version} must be greater than the last published ({self._published})")
        stream = self._pool is not None and self._specs is not None
        named, specs = (None, self._specs.wire_specs()) if stream else self._checked(named_tensors)
        peers = self._roster.live()
        tcp_peers = [p for p in peers if not p.shm]
        sent_to: list[str] = []
        if self._pool is not None:  # also with no generator on this host now: one that joins gets it from here
            offsets, size = layout([s.nbytes for s in specs])
            segment = self._acquire(size, timeout_s, {p.name for p in peers if p.shm})
            try:
                if stream:
                    _copy_in(segment, specs, offsets, named_tensors)
                    named = list(zip([s.name for s in specs], segment.views(specs, offsets)))  # for socket frames
                else:
                    segment.write([t for _, t in named], offsets)
            except BaseException:
                self._pool.assign(segment, set())  # nobody holds a half-written buffer
                raise
            fields = dict(tensors=specs, weight_version=version, bucket=0, num_buckets=1, shm_path=segment.path,
                          shm_size=size, offsets=tuple(offsets))
            frames = encode(self._control.header(WeightsHeader, **fields))
            with self._lock:
                # the generators live now: one lost while acquire waited holds nothing (the roster drops a peer
                # before forgetting it), one that joined meanwhile is sent this update (its catch-up waits here)
                shm_peers = [p for p in self._roster.live() if p.shm]
                sent_to = [p.name for p in shm_peers]
                self._pool.assign(segment, set(sent_to))
                self._pool.pin(segment)
                self._newest_shm = _NewestInShm(segment, fields)
                self._recipients = set(sent_to)
                with self._roster.cond:
                    self._shm_paths[version] = segment.path
                for peer in shm_peers:
                    self._control.enqueue([peer.identity], frames)
                direct, leaders = self._relay.plan(version, specs, tcp_peers, timeout_s)
        else:
            with self._lock:
                self._recipients = set()
                direct, leaders = self._relay.plan(version, specs, tcp_peers, timeout_s)
        if tcp_peers:
            try:
                self._send_frames(version, named, direct, timeout_s, leaders)
            finally:
                with self._lock:
                    self._relay.arm(version, timeout_s)
            sent_to += [p.name for p in tcp_peers]  # the leaders' host peers get it through them
        self._published = version
        with self._roster.cond:
            for old in [v for v in self._acks if v <= version - _ACK_HISTORY]:
                del self._acks[old]
            for old in [v for v in self._shm_paths if v <= version - _ACK_HISTORY]:
                del self._shm_paths[old]
        return sent_to

    def catch_up(self, version: int,
                 weights: Callable[[], Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]],
                 timeout_s: float) -> list[str]:
        """Send ``version``, the newest published, as socket frames to the live generators that joined
        since it was published and got it from no shared-memory buffer; ``weights()`` (called only when
        one needs it) must return the tensors published as ``version``. Returns their names."""
        with self._lock:
            if version != self._published:
                return []
            waiting = self._relay.waiting_followers(version)  # their leader may still relay it
            missing = [p for p in self._roster.live()
                       if not p.shm and p.name not in self._recipients and p.name not in waiting]
        if not missing:
            return []
        named, _ = self._checked(weights())
        self._send_frames(version, named, missing, timeout_s)
        names = [p.name for p in missing]
        log.info("generators %s joined after weight version %d: sent it to them", names, version)
        return names

    def _checked(self, named_tensors) -> tuple[list[tuple[str, torch.Tensor]], tuple]:
        """``[(name, tensor)]`` and their specs, checked against the model's (when known) and the wire's limits."""
        named = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        specs = tuple(tensor_spec(name, t) for name, t in named)
        if self._specs is not None:
            self._specs.check_published(specs)
        check_specs(specs, WireLimits())
        return named, specs

    def _send_frames(self, version: int, named: list[tuple[str, torch.Tensor]], peers: list[GeneratorInfo],
                     timeout_s: float, leaders: list[GeneratorInfo] = ()) -> None:
        """Send ``version`` to ``peers`` and ``leaders`` (marked ``relay``) as buckets of tensor frames; returns
        once they were written to the socket."""
        buckets = bucketize(named, self._config.bucket_bytes)
        sent = _Sent(len(buckets) * (len(peers) + len(leaders)))
        for i, bucket in enumerate(buckets):
            tensors = [t.detach() for _, t in bucket]
            specs = tuple(tensor_spec(n, t) for n, t in bucket)
            for relay, to in ((False, peers), (True, leaders)):
                if not to:
                    continue
                frames = encode(self._control.header(WeightsHeader, tensors=specs, weight_version=version, bucket=i,
                                                     num_buckets=len(buckets), relay=relay), tensors)
                for peer in to:
                    self._control.enqueue([peer.identity], frames, sent)
                    self._control.stats["weight_bytes_sent"] += sum(s.nbytes for s in specs)
        self._wait_sent(sent, timeout_s, [p.name for p in [*peers, *leaders]])
        with self._lock:
            self._recipients.update(p.name for p in [*peers, *leaders])

    def _acquire(self, size: int, timeout_s: float, holders: set[str]) -> Segment:
        """A free buffer; the generators that still hold the oldest one after ``timeout_s`` are dropped."""
        while True:
            try:
                return self._pool.acquire(size, timeout_s, holders)
            except BuffersHeld as e:
                self._drop_unacked(e.oldest_holders, timeout_s)
                holders = holders - e.oldest_holders

    def _drop_unacked(self, names: set[str], waited_s: float) -> None:
        """Drop ``names``, which hold the oldest buffer, from the roster (state ``unacked``)."""
        self._drop(names, UNACKED, f"dropped from the roster: no ack of a weight update for more than {waited_s:g} s "
                                   "(it holds the oldest shared-memory buffer)")

    def _drop(self, names: set[str], state: str, reason: str) -> None:
        """Drop ``names`` from the roster (as ``state``), ask them to shut down and free their buffers."""
        for peer in self._roster.live():
            if peer.name in names and self._roster.remove(peer.identity, state, reason) is not None:
                log.warning("generator %s %s", peer.name, reason)
                self._control.enqueue([peer.identity], encode(self._control.header(ShutdownHeader, reason=reason)))
        for name in names:
            self._forget(name)

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


def _copy_in(segment: Segment, specs: tuple[TensorSpec, ...], offsets: list[int], named_tensors) -> None:
    """Copy each ``(name, tensor)`` into its place in ``segment`` as it comes (``ValueError`` unless the
    tensors are exactly ``specs``)."""
    place = {s.name: (s, off) for s, off in zip(specs, offsets)}
    for name, tensor in (named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors):
        spec, off = place.pop(name, (None, 0))
        got = tensor_spec(name, tensor)
        if spec is None or got != spec:
            raise ValueError(f"weight update tensor {name!r} {got.dtype}{list(got.shape)}: the model has "
                             f"{'no such tensor (or it came twice)' if spec is None else f'{spec.dtype}{list(spec.shape)}'}")
        segment.write([tensor], [off])
    if place:
        raise ValueError(f"weight update does not match the model's specs: missing {sorted(place)[:5]}")


class WeightReceiver:
    """Generator side: complete, checked updates handed over one at a time; headers to the trainer (acks,
    relays) sent through ``send(header_cls, **fields)``."""

    def __init__(self, config: TransportConfig, specs: WeightSpecs | None, limits: WireLimits,
                 send: Callable[..., None]) -> None:
        self._specs = specs
        self._limits = limits
        self._send = send
        self._cond = threading.Condition()
        self._pending: WeightUpdate | None = None
        self.newest = -1
        self.current_version = -1
        """Version of the last update handed to the user (-1: none yet)."""
        self._staging = Staging(max_buckets=max(limits.max_tensors, 1))
        self._reader = ShmReader(config.shm_dir, config.shm_buffers + 1)
        self._relay = RelayLeader(config, send)
        self._relaying: list[threading.Thread] = []
        """Threads copying an update for this host's peers (``relay``)."""

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
            try:
                views = self._reader.view(header.shm_path, header.shm_size, header.tensors, dtypes, header.offsets)
            except WireError:
                self._send(WeightsAckHeader, weight_version=header.weight_version, applied=False, refused=True)
                raise
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
        if header.relay:  # the whole-model copy runs off this thread, which keeps the heartbeats going
            self._relaying = [t for t in self._relaying if t.is_alive()]
            thread = threading.Thread(target=self._relay_and_hand_over, args=(header.weight_version, complete),
                                      name=f"relay-v{header.weight_version}", daemon=True)
            self._relaying.append(thread)
            thread.start()
        else:
            self._hand_over(header.weight_version, complete, None)
        return True

    def _relay_and_hand_over(self, version: int, complete: dict[str, torch.Tensor]) -> None:
        """Relay thread: copy the update for this host's peers, then hand it (views of the copy) to the user."""
        complete, release = self._relay.relay(version, complete)
        self._hand_over(version, complete, release)

    def _hand_over(self, version: int, complete: dict[str, torch.Tensor], release: Callable[[], None] | None) -> None:
        """Make ``complete`` the update the user gets next, unless a newer one got there first (then it is
        acked as skipped); ``release`` frees its relay copy when the user is done with it."""
        def ack(applied: bool) -> None:
            if release is not None:
                release()
            self._send_ack(version, applied)

        update, skipped = WeightUpdate(version, complete, _ack=ack), None
        with self._cond:
            if version > self.newest:
                skipped, self._pending, self.newest, update = self._pending, update, version, None
                self._cond.notify_all()
        for never_handed_over in (skipped, update):  # replaced by a newer one, or older than the newest
            if never_handed_over is not None:
                never_handed_over.ack(applied=False)

    def on_release(self, header: WeightsReleaseHeader) -> None:
        """The trainer's peers took this generator's relayed copy of a version."""
        self._relay.release(header)

    def _send_ack(self, version: int, applied: bool) -> None:
        self._send(WeightsAckHeader, weight_version=version, applied=applied)

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

    def close(self, join_timeout_s: float = 10.0) -> None:
        for thread in self._relaying:  # a copy in flight ends before its file is removed
            thread.join(join_timeout_s)
        self._reader.close()
        self._relay.close()
