"""Rollouts, generator -> trainer: PUSH (generators connect) -> PULL (the trainer binds).

Per-sender order is kept (one ZeroMQ pipe per sender, one sending thread). The trainer
drops duplicates: a sequence number not above the sender's last one, or a rollout id seen
within the last ``dedup_window`` rollouts.
"""

from __future__ import annotations

from collections import OrderedDict

import zmq

from rlhf_engine.transport.channel import RecvChannel, SendChannel
from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.messages import Rollout
from rlhf_engine.transport.wire import RolloutHeader, WireError

DEDUP_WINDOW = 1 << 17


class RolloutSender:
    """Generator side. ``send`` blocks under back-pressure (see ``channel.py``)."""

    def __init__(self, context: zmq.Context, config: TransportConfig, sender_id: str, security: Security,
                 health=lambda: None) -> None:
        self._config = config
        self._sender_id = sender_id
        sock = open_socket(context, zmq.PUSH, channel_endpoint(config.endpoint, "rollouts"), bind=False,
                           security=security, config=config, hwm=config.rollout_hwm)
        self._channel = SendChannel(f"rollouts-send[{sender_id}]", sock, queue_size=config.rollout_queue_size,
                                    linger_ms=config.linger_ms, blocked_log_s=config.blocked_log_s, health=health)
        self._channel.start()

    def send(self, rollout: Rollout, timeout_s: float | None = None) -> None:
        """Queue one rollout; blocks while the trainer is behind (``BackpressureTimeout`` after the timeout)."""
        timeout = self._config.send_timeout_s if timeout_s is None else timeout_s
        self._channel.send(lambda seq: rollout.to_wire(self._sender_id, seq), timeout)

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
    """Trainer side: validated, de-duplicated rollouts from every generator, fair-queued."""

    def __init__(self, context: zmq.Context, config: TransportConfig, security: Security,
                 dedup_window: int = DEDUP_WINDOW) -> None:
        self._last_seq: dict[str, int] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_window = dedup_window
        sock = open_socket(context, zmq.PULL, channel_endpoint(config.endpoint, "rollouts"), bind=True,
                           security=security, config=config, hwm=config.rollout_hwm)
        self._channel = RecvChannel("rollouts-recv", sock, queue_size=config.rollout_queue_size,
                                    linger_ms=config.linger_ms, limits=config.limits, accept=self._accept)
        self._channel.start()

    def _accept(self, header, tensors) -> Rollout | None:  # runs on the IO thread
        if not isinstance(header, RolloutHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the rollout channel")
        rollout = Rollout.from_wire(header, tensors)
        last = self._last_seq.get(header.sender, -1)
        if header.seq <= last or rollout.rollout_id in self._seen:
            self._channel.stats["duplicates"] += 1
            return None
        self._last_seq[header.sender] = header.seq
        self._seen[rollout.rollout_id] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        return rollout

    def recv(self, timeout_s: float | None = None, health=lambda: None) -> Rollout | None:
        """The next rollout, or None after ``timeout_s`` (None = wait forever)."""
        return self._channel.get(timeout_s, health)

    @property
    def depth(self) -> int:
        return self._channel.depth

    @property
    def stats(self):
        return self._channel.stats

    def close(self) -> bool:
        return self._channel.close()
