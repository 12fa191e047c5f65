"""The trainer's roster: which generators completed the handshake, which are live, which were lost.

A generator joins with a HELLO (its name, and the ZAP User-Id of its connection when CURVE
is on); it is lost when it is silent for ``heartbeat_timeout_s``, dropped as ``unacked`` when
it holds a weight buffer that a publish waited ``ack_timeout_s`` for, and leaves when it says
goodbye. None is an error on the trainer's side: the generator moves out of ``live()``
and is handed once to ``pop_lost()``, so that the engine can re-issue its prompts. A
generator may join again at any time with a new HELLO (a new session).

Every name that completed a handshake in this run stays known with the User-Id it joined
with: ``authenticate`` tells the rollout channel whether a rollout's claimed sender matches
the connection it came through. Why a generator was removed is kept for its connection
(``removal_reason``, the latest ``MAX_REASONS``): a message it sends before it has read its
shutdown is answered with that reason, not a generic one.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable

LIVE, LOST, UNACKED, REFUSED, LEFT = "live", "lost", "unacked", "refused", "left"
MAX_REASONS = 64
"""Removal reasons kept (the latest), so that a peer that keeps reconnecting cannot grow them."""


@dataclass
class GeneratorInfo:
    name: str
    """The generator's unique name (``GeneratorPort.sender_id``); ``Sample.sender`` names it."""
    hostname: str
    shm: bool
    """Weight updates reach it through shared memory."""
    identity: bytes
    """Its routing id on the control socket (one per connection)."""
    last_seen: float
    user_id: str | None = None
    """ZAP User-Id of its connection (the z85 CURVE public key), None without CURVE."""
    state: str = LIVE
    """``live``, ``lost`` (heartbeat timeout), ``unacked`` (held a weight buffer too long), ``refused`` (refused the
    trainer's own shared-memory file) or ``left`` (said goodbye)."""
    host_shm: bool = False
    """Its HELLO said it can use shared memory on its own host (its ``weights_via_shm``): it can take part
    in a relay among the generators of its host (``relay.py``)."""


class Roster:
    """Thread-safe; ``cond`` is notified on every change."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._live: dict[bytes, GeneratorInfo] = {}
        self._lost: list[GeneratorInfo] = []
        self._sessions: dict[str, str | None] = {}
        self._reasons: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def join(self, identity: bytes, name: str, hostname: str, shm: bool, user_id: str | None,
             host_shm: bool = False) -> str:
        """Add a generator; returns a reason to refuse it, or "" when it joined."""
        with self.cond:
            for peer in self._live.values():
                if peer.name == name and peer.identity != identity:
                    return f"generator name {name!r} is already connected"
            old = self._live.pop(identity, None)
            if old is not None:  # a second HELLO on one connection: a new session replaces the old
                old.state = LOST
                self._lost.append(old)
            self._live[identity] = GeneratorInfo(name, hostname, shm, identity, time.monotonic(), user_id,
                                                 host_shm=host_shm)
            self._reasons.pop(identity, None)
            self._sessions[name] = user_id
            self.cond.notify_all()
            return ""

    def seen(self, identity: bytes) -> GeneratorInfo | None:
        """Record a sign of life; the live generator on ``identity``, or None."""
        with self.cond:
            peer = self._live.get(identity)
            if peer is not None:
                peer.last_seen = time.monotonic()
            return peer

    def remove(self, identity: bytes, state: str, reason: str = "") -> GeneratorInfo | None:
        """Move a live generator out (``lost``, ``unacked`` or ``left``); it is reported once by ``pop_lost``.
        ``reason``: what its shutdown says (kept for ``removal_reason``)."""
        with self.cond:
            peer = self._live.pop(identity, None)
            if peer is not None:
                peer.state = state
                self._lost.append(peer)
                if reason:
                    self._reasons[identity] = reason
                    while len(self._reasons) > MAX_REASONS:
                        self._reasons.popitem(last=False)
                self.cond.notify_all()
            return peer

    def removal_reason(self, identity: bytes) -> str:
        """Why the generator on ``identity`` was removed ("" if it was not, or not lately)."""
        with self.cond:
            return self._reasons.get(identity, "")

    def expire(self, timeout_s: float, reason: str = "") -> list[GeneratorInfo]:
        """Remove (as lost, with ``reason``) every live generator silent for more than ``timeout_s``."""
        now = time.monotonic()
        with self.cond:
            silent = [p.identity for p in self._live.values() if now - p.last_seen > timeout_s]
            return [self.remove(identity, LOST, reason) for identity in silent]

    def live(self) -> list[GeneratorInfo]:
        """The live generators, longest-lived (earliest joined) first."""
        with self.cond:
            return list(self._live.values())

    def pop_lost(self) -> list[GeneratorInfo]:
        with self.cond:
            lost, self._lost = self._lost, []
            return lost

    def authenticate(self, name: str, user_id: str | None) -> str:
        """"" if ``name`` completed a handshake in this run through a connection with ``user_id``;
        else the drop reason: ``unknown_sender`` or ``forged_sender``."""
        with self.cond:
            if name not in self._sessions:
                return "unknown_sender"
            return "" if self._sessions[name] == user_id else "forged_sender"

    def wait(self, ready: Callable[[], object], timeout_s: float, check: Callable[[], None]) -> object:
        """Wait until ``ready()`` (called with the lock held) returns something other than None;
        returns it, or None after ``timeout_s``. ``check()`` runs without the lock every 0.1 s (it may raise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            check()
            with self.cond:
                result = ready()
                left = deadline - time.monotonic()
                if result is not None or left <= 0:
                    return result
                self.cond.wait(min(left, 0.1))
