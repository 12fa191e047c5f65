"""Weight updates on the generator: complete, checked updates handed to the user one at a time.

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
from typing import Callable

import torch

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.messages import WeightUpdate
from rlhf_engine.transport.relay import RelayLeader
from rlhf_engine.transport.shm import ShmReader
from rlhf_engine.transport.weights import Staging, WeightSpecs
from rlhf_engine.transport.wire import (
    WeightsAckHeader,
    WeightsHeader,
    WeightsReleaseHeader,
    WireError,
    WireLimits,
    check_specs,
)

log = logging.getLogger(__name__)


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
