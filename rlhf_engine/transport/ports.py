"""The two ends as one object each: ``TrainerPort`` (binds) and ``GeneratorPort`` (connects).

Each owns its ZeroMQ context, its channels and their IO threads; ``close()`` stops them
(idempotent, returns in about a second even with messages in flight) and both are context
managers. Blocking calls on the generator side raise ``PeerDeadError`` when the trainer
stops sending heartbeats and ``ShutdownRequested`` once it asked to stop.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Iterable, Mapping

import torch
import zmq

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.control import GeneratorControl, GeneratorInfo, TrainerControl
from rlhf_engine.transport.endpoints import Security
from rlhf_engine.transport.messages import PromptBatch, Rollout, WeightUpdate
from rlhf_engine.transport.prompts import PromptReceiver, PromptSender
from rlhf_engine.transport.rollouts import RolloutReceiver, RolloutSender

log = logging.getLogger(__name__)


def _unique_id(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Port:
    """What both ends share: the ZeroMQ context, the channel parts built in ``_open`` (closed in
    reverse order), stats and an idempotent ``close``."""

    def __init__(self, config: TransportConfig, fingerprint: str, name: str) -> None:
        self.config = config
        self.sender_id = _unique_id(name)
        self._context = zmq.Context()
        self._parts: list = []
        self._closed = False
        try:
            self._open(fingerprint)
        except BaseException:
            self.close()
            raise

    def _open(self, fingerprint: str) -> None:
        raise NotImplementedError

    def _own(self, part):
        self._parts.append(part)
        return part

    @property
    def rollout_queue_depth(self) -> int:
        return self._rollouts.depth

    def stats(self) -> dict[str, dict[str, int]]:
        return {"control": dict(self._control.stats), "rollouts": dict(self._rollouts.stats),
                "prompts": dict(self._prompts.stats)}

    def close(self) -> None:
        """Stop everything (idempotent); queued messages get ``linger_ms`` to leave."""
        if self._closed:
            return
        self._closed = True
        stopped = [part.close() for part in reversed(self._parts)]
        if all(stopped):
            self._context.term()
        else:  # a thread still holds its socket: term() would wait for it forever
            log.error("%s: leaving the ZeroMQ context open, a transport thread did not stop", self.sender_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainerPort(_Port):
    """The trainer's end: binds the endpoints, receives rollouts, sends prompts and weights.

    ``fingerprint`` is ``model_fingerprint(...)`` of the policy; generators with another
    fingerprint or protocol version are refused (``HandshakeError`` in ``wait_for_generators``).
    """

    def __init__(self, config: TransportConfig, fingerprint: str, name: str = "trainer") -> None:
        super().__init__(config, fingerprint, name)

    def _open(self, fingerprint: str) -> None:
        config = self.config
        self._security = self._own(Security(config, server=True, context=self._context))
        self._control = self._own(TrainerControl(self._context, config, fingerprint, self.sender_id, self._security))
        self._rollouts = self._own(RolloutReceiver(self._context, config, self._security))
        self._prompts = self._own(PromptSender(self._context, config, self.sender_id, self._security))

    def wait_for_generators(self, n: int, timeout_s: float | None = None) -> list[GeneratorInfo]:
        """Block until ``n`` generators completed the handshake."""
        return self._control.wait_for_generators(n, self.config.handshake_timeout_s if timeout_s is None else timeout_s)

    def generators(self) -> list[GeneratorInfo]:
        """Live generators (handshake done, heartbeats arriving)."""
        return self._control.generators("live")

    def dead_generators(self) -> list[GeneratorInfo]:
        return self._control.generators("dead")

    def raise_if_dead(self) -> None:
        """``PeerDeadError`` naming every generator whose heartbeats stopped."""
        self._control.raise_if_dead()

    def recv_rollout(self, timeout_s: float | None = None) -> Rollout | None:
        """The next rollout from any generator (order per generator kept), or None after ``timeout_s``."""
        return self._rollouts.recv(timeout_s)

    def recv_rollouts(self, n: int, timeout_s: float | None = None) -> list[Rollout]:
        """Up to ``n`` rollouts: waits for the first (up to ``timeout_s``), then takes what is queued."""
        first = self._rollouts.recv(timeout_s)
        if first is None:
            return []
        out = [first]
        while len(out) < n:
            item = self._rollouts.recv(0)
            if item is None:
                break
            out.append(item)
        return out

    def send_prompts(self, batch: PromptBatch, timeout_s: float | None = None) -> None:
        """Hand a batch to the next generator with room; blocks while all are busy."""
        self._prompts.send(batch, timeout_s)

    def publish_weights(self, version: int,
                        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        timeout_s: float | None = None) -> list[str]:
        """Send weight ``version`` to every live generator; returns their ids. When it returns,
        the tensors may be modified (they were copied to shared memory or written to the sockets)."""
        return self._control.publish_weights(version, named_tensors,
                                             self.config.ack_timeout_s if timeout_s is None else timeout_s)

    def wait_for_acks(self, version: int, timeout_s: float | None = None,
                      generators: Iterable[str] | None = None) -> dict[str, bool]:
        """``{generator_id: applied}`` once each generator acknowledged ``version``."""
        return self._control.wait_for_acks(version, self.config.ack_timeout_s if timeout_s is None else timeout_s,
                                           generators)

    def shutdown_generators(self, reason: str = "trainer shutdown") -> None:
        """Ask every live generator to stop (their blocking calls raise ``ShutdownRequested``)."""
        self._control.shutdown_generators(reason)

    @property
    def rejections(self) -> list[str]:
        """Reasons of refused handshakes."""
        return list(self._control.rejections)


class GeneratorPort(_Port):
    """A generator's end: connects, handshakes (``HandshakeError`` if refused), then pulls
    prompts, pushes rollouts and receives complete weight updates."""

    def __init__(self, config: TransportConfig, fingerprint: str, name: str = "generator") -> None:
        super().__init__(config, fingerprint, name)

    def _open(self, fingerprint: str) -> None:
        config = self.config
        self._security = self._own(Security(config, server=False, context=self._context))
        self._control = self._own(GeneratorControl(self._context, config, fingerprint, self.sender_id, self._security))
        self._prompts = self._own(PromptReceiver(self._context, config, self._security))
        self._rollouts = self._own(RolloutSender(self._context, config, self.sender_id, self._security,
                                                 health=self._control.health))

    def recv_prompts(self, timeout_s: float | None = None) -> PromptBatch | None:
        """The next prompt batch, or None after ``timeout_s``."""
        return self._prompts.recv(timeout_s, self._control.health)

    def send_rollout(self, rollout: Rollout, timeout_s: float | None = None) -> None:
        """Queue one rollout; blocks under back-pressure (``BackpressureTimeout`` after the timeout)."""
        self._rollouts.send(rollout, timeout_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued rollout was handed to the socket."""
        return self._rollouts.flush(timeout_s)

    def poll_weights(self) -> WeightUpdate | None:
        """The newest complete weight update not yet taken, or None (never a partial one)."""
        self._control.health()
        return self._control.poll_weights()

    def wait_weights(self, min_version: int, timeout_s: float | None = None) -> WeightUpdate | None:
        """Wait for an update with version >= ``min_version``; None if ``current_version`` already is."""
        return self._control.wait_weights(min_version, timeout_s)

    @property
    def current_version(self) -> int:
        """Version of the last update handed out (-1 before the first)."""
        return self._control.current_version

    @property
    def shutdown_requested(self) -> bool:
        return self._control.shutdown_requested

    def check(self) -> None:
        """Raise ``ShutdownRequested`` / ``PeerDeadError`` if the trainer asked to stop or died."""
        self._control.health()
