"""Rollouts, generator -> trainer: PUSH (generators connect) -> PULL (the trainer binds).

Per-sender order is kept (one ZeroMQ pipe per sender, one sending thread). The trainer
accepts a rollout only from a sender that completed the handshake in this run, through a
connection with the same ZAP User-Id (CURVE key) it joined with (``Roster.authenticate``),
and only within the size the config allows (``limits.rollout_limits``); it drops duplicates:
a sequence number not above the sender's last one, or a (sender, prompt id, rollout id) seen
within the last ``dedup_window`` rollouts (keyed by prompt too, so that a re-issued subset of a
batch, whose prompts a generator may number from 0 again, is not taken for a repeat). Every drop is counted by reason (``unknown_sender``,
``forged_sender``, ``rollout_too_large``, ``duplicate``, ...).
"""

from __future__ import annotations

from collections import OrderedDict

import zmq

from rlhf_engine.data.samples import Sample
from rlhf_engine.transport.channel import RecvChannel, SendChannel
from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.limits import rollout_limits
from rlhf_engine.transport.messages import sample_from_wire, sample_to_wire
from rlhf_engine.transport.roster import Roster
from rlhf_engine.transport.wire import RolloutHeader, WireError

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
