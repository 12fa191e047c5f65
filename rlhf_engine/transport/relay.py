"""Weight relay among the generators of one host: one copy of an update over the network per host.

Generators on socket frames (another host, or shared memory off on the trainer) whose HELLO said
they can use shared memory on their own host are grouped by hostname. For each group of two or
more, a publish sends the frames only to one of them, the *leader* (the longest-lived member that
never failed as one), marked ``relay``. The leader copies the complete update into a shared-memory
file of its own (``RelayLeader``: at most ``shm_buffers`` files named for its pid, so that
``shm.remove_stale_files`` sweeps them if it dies) and answers ``WEIGHTS_RELAYED``. The trainer
(``RelayRounds``) then sends each *follower* the same shared-memory ``WeightsHeader`` a local
generator gets — the trainer's own specs and offsets, only path and size from the leader — and,
once every follower acked (or left), ``WEIGHTS_RELEASE`` so that the leader may reuse the file.

Failures fall back to socket frames through ``WeightPublisher.catch_up`` (which the engine calls
while it waits for rollouts): the followers of a round are not recipients until it is relayed, so a
leader that is lost, says it cannot relay (every buffer held), sends a wrong size, or does not
answer within the publish's timeout leaves them to the catch-up. A follower whose checks refuse the
leader's file (``ShmReader``: path outside its ``shm_dir``, size or offsets that do not fit the file)
says so in its ack (``refused``) and gets frames too. A leader that failed that way (or timed out) is
never picked again. A relayed header from anyone but the leader of a round still waiting for it is
dropped and counted (``bad_relay``, ``late_relay``); the file it names is released anyway.

Trust: a follower checks where the leader's file is and that the tensors fit in it, not what it holds:
it trusts its leader's bytes as it trusts the trainer's (a peer that passed CURVE, on its own host,
under the same user). A follower that never acks keeps the leader's file held; once all its files are
held the leader stops relaying and its peers get frames.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.iothread import ControlThread
from rlhf_engine.transport.roster import GeneratorInfo
from rlhf_engine.transport.shm import BuffersHeld, ShmPool, layout
from rlhf_engine.transport.wire import (
    MAX_REASON_CHARS,
    TensorSpec,
    WeightsHeader,
    WeightsRelayedHeader,
    WeightsReleaseHeader,
    WireError,
    encode,
    tensor_spec,
)

log = logging.getLogger(__name__)

WAITING, RELAYED, CLOSED = "waiting", "relayed", "closed"
_HISTORY = 16
"""Rounds older than this many versions are forgotten (a relayed one is released first)."""


@dataclass(eq=False)
class _Round:
    """One version relayed on one host."""

    version: int
    leader: GeneratorInfo
    followers: dict[str, GeneratorInfo]
    """Waiting: those to send it to once relayed; relayed: those that have not acked yet."""
    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]
    size: int
    deadline: float
    state: str = WAITING
    shm_path: str = ""


class RelayRounds:
    """Trainer side: who relays which version to whom. Not thread-safe: ``WeightPublisher`` calls it under
    its lock (from the user's thread and the IO thread); it sends through ``control.enqueue``."""

    def __init__(self, control: ControlThread, enabled: bool) -> None:
        self._control = control
        self._enabled = enabled
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._distrusted: set[str] = set()
        """Generators that failed as leaders (refused by a follower, a wrong size, no answer in time)."""

    def plan(self, version: int, specs: tuple[TensorSpec, ...], peers: list[GeneratorInfo],
             timeout_s: float) -> tuple[list[GeneratorInfo], list[GeneratorInfo]]:
        """Split ``peers`` (on socket frames, longest-lived first) into those sent frames directly and the
        leaders sent frames to relay; opens a round per leader. Older rounds still waiting are closed."""
        self._expire_history(version)
        for r in self._rounds.values():
            if r.state == WAITING:
                r.state = CLOSED  # superseded: its followers get this version
        if not self._enabled:
            return list(peers), []
        groups: dict[str, list[GeneratorInfo]] = defaultdict(list)
        for p in peers:
            if p.host_shm:
                groups[p.hostname].append(p)
        grouped = {p.name for members in groups.values() if len(members) > 1 for p in members}
        direct = [p for p in peers if p.name not in grouped]
        leaders = []
        offsets, size = layout([s.nbytes for s in specs])
        for members in groups.values():
            if len(members) < 2:
                continue
            trusted = [p for p in members if p.name not in self._distrusted]
            if not trusted:
                direct += members
                continue
            leader = trusted[0]
            followers = {p.name: p for p in members if p is not leader}
            self._rounds[(leader.name, version)] = _Round(version, leader, followers, specs, tuple(offsets), size,
                                                          time.monotonic() + timeout_s)
            leaders.append(leader)
        return direct, leaders

    def arm(self, version: int, timeout_s: float) -> None:
        """The leaders were sent ``version``: each has ``timeout_s`` from now to relay it."""
        for r in self._rounds.values():
            if r.version == version and r.state == WAITING:
                r.deadline = time.monotonic() + timeout_s

    def waiting_followers(self, version: int) -> set[str]:
        """Followers of ``version`` whose leader may still relay it (a leader past its deadline is closed,
        and never picked again): ``catch_up`` leaves them alone."""
        now, out = time.monotonic(), set()
        for r in self._rounds.values():
            if r.version != version or r.state != WAITING:
                continue
            if now > r.deadline:
                r.state = CLOSED
                self._distrusted.add(r.leader.name)
                log.warning("generator %s did not relay weight version %d in time: %s get it as frames, and %s "
                            "relays no more", r.leader.name, version, sorted(r.followers), r.leader.name)
            else:
                out.update(r.followers)
        return out

    def relayed(self, peer: GeneratorInfo, header: WeightsRelayedHeader) -> list[str]:
        """``peer`` relayed a version (or says it could not): sends its followers their shared-memory header;
        returns their names (now recipients). ``WireError`` for a header that is not the answer of a leader
        to a round waiting for it (the file it names is released)."""
        version = header.weight_version
        r = self._rounds.get((peer.name, version))
        if r is None or r.state != WAITING:
            self._release(peer, version, header.shm_path)
            reason = "bad_relay" if r is None else "late_relay"
            raise WireError(reason, f"generator {peer.name} relayed weight version {version}, which it was "
                                    f"{'not asked to relay' if r is None else 'no longer expected to relay'}")
        if not header.shm_path:
            r.state = CLOSED
            log.info("generator %s did not relay weight version %d (%s): %s get it as frames", peer.name, version,
                     header.reason or "no reason given", sorted(r.followers))
            return []
        if header.shm_size != r.size:
            r.state = CLOSED
            self._distrusted.add(peer.name)
            self._release(peer, version, header.shm_path)
            raise WireError("bad_relay", f"generator {peer.name} relayed weight version {version} in {header.shm_size} "
                                         f"bytes; its layout takes {r.size}: it relays no more")
        r.state, r.shm_path = RELAYED, header.shm_path
        frames = encode(self._control.header(WeightsHeader, tensors=r.specs, weight_version=version, bucket=0,
                                             num_buckets=1, shm_path=r.shm_path, shm_size=r.size, offsets=r.offsets))
        for follower in r.followers.values():
            self._control.enqueue([follower.identity], frames)
        names = list(r.followers)
        if not names:
            self._finish(r)
        return names

    def acked(self, name: str, version: int) -> None:
        """Follower ``name`` acked ``version``; the last one's ack releases the leader's file."""
        for r in list(self._rounds.values()):
            if r.version == version and r.state == RELAYED and r.followers.pop(name, None) is not None \
                    and not r.followers:
                self._finish(r)

    def refused(self, name: str, version: int) -> str | None:
        """Follower ``name`` refused the leader's file of ``version``: the leader's name (it relays no more),
        or None if ``name`` was not a follower waiting for it."""
        for r in self._rounds.values():
            if r.version == version and r.state == RELAYED and name in r.followers:
                self._distrusted.add(r.leader.name)
                self.acked(name, version)
                return r.leader.name
        return None

    def forget(self, name: str) -> None:
        """``name`` was lost or left: its rounds as leader close (their followers are left to the catch-up);
        as follower it is waited for no more."""
        for r in list(self._rounds.values()):
            if r.leader.name == name:
                r.state = CLOSED
            elif r.followers.pop(name, None) is not None and r.state == RELAYED and not r.followers:
                self._finish(r)

    def _expire_history(self, version: int) -> None:
        for key, r in list(self._rounds.items()):
            if r.version <= version - _HISTORY:
                if r.state == RELAYED:
                    self._finish(r)
                del self._rounds[key]

    def _finish(self, r: _Round) -> None:
        r.state = CLOSED
        self._release(r.leader, r.version, r.shm_path)

    def _release(self, leader: GeneratorInfo, version: int, path: str) -> None:
        if path:
            self._control.enqueue([leader.identity], encode(self._control.header(
                WeightsReleaseHeader, weight_version=version, shm_path=path)))


_TRAINER, _SELF = "trainer", "self"


class RelayLeader:
    """Generator side: the shared-memory copies of the updates this generator relays to its host's peers.
    At most ``shm_buffers`` files (kind ``relay``); each is held by the trainer (until ``WEIGHTS_RELEASE``)
    and by this generator's own user (until it acks the update, whose tensors are views of the file)."""

    def __init__(self, config: TransportConfig, send: Callable[..., None]) -> None:
        self._config = config
        self._send = send
        self._pool: ShmPool | None = None

    def relay(self, version: int, complete: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], Callable[[], None] | None]:
        """Copy ``complete`` into a free buffer and tell the trainer. Returns the tensors to hand to the user
        (views of that buffer) and what releases the user's hold; ``complete`` and None when it could not."""
        specs = [tensor_spec(name, t) for name, t in complete.items()]
        offsets, size = layout([s.nbytes for s in specs])
        try:
            if not self._config.generator_shm:
                raise OSError("shared memory is off on this generator (transport.weights_via_shm)")
            if self._pool is None:
                self._pool = ShmPool(self._config.shm_dir, self._config.shm_buffers, kind="relay")
            segment = self._pool.acquire(size, 0.0, {_TRAINER, _SELF})
        except (BuffersHeld, OSError) as e:
            reason = (f"all {self._config.shm_buffers} relay buffers are held (shm_buffers)"
                      if isinstance(e, BuffersHeld) else f"cannot make a relay buffer: {e}")
            log.warning("not relaying weight version %d: %s", version, reason)
            self._send(WeightsRelayedHeader, weight_version=version, reason=reason[:MAX_REASON_CHARS])
            return complete, None
        segment.write(list(complete.values()), offsets)
        self._send(WeightsRelayedHeader, weight_version=version, shm_path=segment.path, shm_size=size)
        pool = self._pool
        return dict(zip(complete, segment.views(specs, offsets))), lambda: pool.release(_SELF, segment.path)

    def release(self, header: WeightsReleaseHeader) -> None:
        """The trainer's peers took the copy at ``header.shm_path``."""
        if self._pool is not None:
            self._pool.release(_TRAINER, header.shm_path)

    def close(self) -> None:
        """Remove this generator's relay files."""
        if self._pool is not None:
            self._pool.close()
