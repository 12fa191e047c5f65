"""The two ends as one object each: ``TrainerPort`` (binds) and ``GeneratorPort`` (connects).

Each owns its ZeroMQ context, its channels and their IO threads; ``close()`` stops them
(idempotent, returns in about a second even with messages in flight) and both are context
managers. Blocking calls on the generator side raise ``PeerDeadError`` when the trainer
stops sending heartbeats and ``ShutdownRequested`` once it asked to stop. On the trainer
side a generator that stops or goes silent is never an error: it leaves the roster and is
reported once by ``pop_lost_generators``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
from typing import Callable, Iterable, Mapping

import torch
import zmq

from rlhf_engine.data.samples import Sample
from rlhf_engine.transport.channel import PromptReceiver, PromptSender, RolloutReceiver, RolloutSender
from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import IpcEndpoint, Security
from rlhf_engine.transport.iothread import drop_counts
from rlhf_engine.transport.messages import PromptBatch, WeightUpdate
from rlhf_engine.transport.roster import GeneratorInfo, Roster
from rlhf_engine.transport.session import GeneratorControl, TrainerControl
from rlhf_engine.transport.shm import remove_stale_files
from rlhf_engine.transport.weights import WeightSpecs

log = logging.getLogger(__name__)

SpecRows = Iterable[tuple]
"""``(name, shape, dtype)`` rows of the model's weights, e.g. ``state_dict_specs(...)`` or ``stored_params(...)``."""


def _unique_id(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Port:
    """What both ends share: the ZeroMQ context, the channel parts built in ``_open`` (closed in
    reverse order), stats and an idempotent ``close``."""

    def __init__(self, config: TransportConfig, fingerprint: str, name: str, weight_specs: SpecRows | None) -> None:
        self.config = config
        self.sender_id = _unique_id(name)
        self._weight_specs = WeightSpecs.of(weight_specs) if weight_specs is not None else None
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

    def drop_counts(self) -> dict[str, int]:
        """``{reason: count}`` of messages dropped since the start, over every channel."""
        return drop_counts(self._control.stats, self._rollouts.stats, self._prompts.stats)

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
    ``weight_specs`` (``(name, shape, dtype)`` rows): every published update must match them
    exactly. With ``config.endpoint`` None the port binds a fresh private ipc endpoint
    (``endpoint`` says where). Starting removes shared-memory files of dead runs.
    """

    def __init__(self, config: TransportConfig, fingerprint: str, name: str = "trainer", *,
                 weight_specs: SpecRows | None = None) -> None:
        super().__init__(config, fingerprint, name, weight_specs)

    def _open(self, fingerprint: str) -> None:
        remove_stale_files(self.config.shm_dir)
        ipc = self._own(IpcEndpoint(self.config.endpoint, self.config.ipc_dir))
        self.config = config = dataclasses.replace(self.config, endpoint=ipc.endpoint)
        self._roster = Roster()
        self._security = self._own(Security(config, server=True, context=self._context))
        self._control = self._own(TrainerControl(self._context, config, fingerprint, self.sender_id, self._security,
                                                 self._roster, self._weight_specs))
        self._rollouts = self._own(RolloutReceiver(self._context, config, self._security, self._roster))
        self._prompts = self._own(PromptSender(self._context, config, self.sender_id, self._security))

    @property
    def endpoint(self) -> str:
        """The base endpoint generators connect to (``GeneratorPort``'s ``config.endpoint``)."""
        return self.config.endpoint

    def wait_for_generators(self, n: int, timeout_s: float | None = None) -> list[GeneratorInfo]:
        """Block until ``n`` generators are live (``HandshakeError`` if one was refused)."""
        return self._control.wait_for_generators(n, self.config.handshake_timeout_s if timeout_s is None else timeout_s)

    def generators(self) -> list[GeneratorInfo]:
        """Live generators (handshake done, heartbeats arriving)."""
        return self._roster.live()

    def pop_lost_generators(self) -> list[GeneratorInfo]:
        """Generators that left the roster since the last call, each once: ``state`` is ``lost``
        (silent for ``heartbeat_timeout_s``), ``unacked`` (a publish waited its timeout for a buffer
        it held; it was told to shut down) or ``left`` (said goodbye)."""
        return self._roster.pop_lost()

    def raise_if_dead(self) -> None:
        """Raise if one of this port's own IO threads failed (never for a lost generator)."""
        for part in (self._control, self._rollouts, self._prompts):
            part.check()

    def recv_rollout(self, timeout_s: float | None = None) -> Sample | None:
        """The next rollout from any generator (order per generator kept), or None after ``timeout_s``;
        its ``sender`` is the authenticated generator's name."""
        return self._rollouts.recv(timeout_s)

    def recv_rollouts(self, n: int, timeout_s: float | None = None) -> list[Sample]:
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

    @property
    def rollout_queue_bytes(self) -> int:
        """Bytes of tensors of the rollouts queued in this process."""
        return self._rollouts.queued_bytes

    def send_prompts(self, batch: PromptBatch, timeout_s: float | None = None) -> None:
        """Hand a batch to the next generator with room; blocks while all are busy. A batch may
        repeat (a subset of) an earlier batch's prompts: a re-issue is not a duplicate."""
        self._prompts.send(batch, timeout_s)

    def publish_weights(self, version: int,
                        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        timeout_s: float | None = None) -> list[str]:
        """Send weight ``version`` to every live generator; returns their names. When it returns,
        the tensors may be modified (they were copied to shared memory or written to the sockets).
        A publish that waits ``timeout_s`` (default ``ack_timeout_s``) for a free shared-memory buffer
        drops the generators that hold the oldest one (``pop_lost_generators``: ``unacked``) and goes on.
        A generator that joins later is sent the newest version from shared memory right away (over
        socket frames: ``catch_up_weights``)."""
        return self._control.weights.publish(version, named_tensors,
                                             self.config.ack_timeout_s if timeout_s is None else timeout_s)

    def catch_up_weights(self, version: int,
                         weights: Callable[[], Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]],
                         timeout_s: float | None = None) -> list[str]:
        """Send the newest published ``version`` to generators on socket frames that joined after it was
        published (those on shared memory got it at their handshake); ``weights()`` returns the tensors
        of ``version`` and is called only when one needs them. Returns their names. Cheap when none does:
        call it whenever convenient (the engine does, while it waits for rollouts)."""
        return self._control.weights.catch_up(version, weights, self.config.ack_timeout_s if timeout_s is None else timeout_s)

    def wait_for_acks(self, version: int, timeout_s: float | None = None,
                      generators: Iterable[str] | None = None) -> dict[str, bool]:
        """``{name: applied}`` once each generator acknowledged ``version`` or was lost (left out)."""
        return self._control.weights.wait_for_acks(
            version, self.config.ack_timeout_s if timeout_s is None else timeout_s, generators)

    def shutdown_generators(self, reason: str = "trainer shutdown") -> None:
        """Ask every live generator to stop (their blocking calls raise ``ShutdownRequested``)."""
        self._control.shutdown_generators(reason)

    @property
    def rejections(self) -> list[str]:
        """Reasons of the latest refused handshakes (also counted in ``drop_counts`` as ``handshake_refused``)."""
        return self._control.refused()


class GeneratorPort(_Port):
    """A generator's end: connects, handshakes (``HandshakeError`` if refused; ``AuthenticationFailed``
    if the trainer refused its CURVE key), then pulls prompts, pushes rollouts and receives complete
    weight updates (checked against ``weight_specs`` when given). With shared memory on, starting removes
    relay files of dead generators on this host (``relay.py``)."""

    def __init__(self, config: TransportConfig, fingerprint: str, name: str = "generator", *,
                 weight_specs: SpecRows | None = None) -> None:
        if config.endpoint is None:
            raise ValueError("a generator needs the trainer's endpoint (transport.endpoint or --connect)")
        super().__init__(config, fingerprint, name, weight_specs)

    def _open(self, fingerprint: str) -> None:
        config = self.config
        if config.generator_shm:  # relay files of a dead generator on this host (``relay.py``)
            remove_stale_files(config.shm_dir)
        self._security = self._own(Security(config, server=False, context=self._context))
        self._control = self._own(GeneratorControl(self._context, config, fingerprint, self.sender_id, self._security,
                                                   weight_specs=self._weight_specs))
        self._prompts = self._own(PromptReceiver(self._context, config, self._security))
        self._rollouts = self._own(RolloutSender(self._context, config, self.sender_id, self._security,
                                                 health=self._control.health))

    def recv_prompts(self, timeout_s: float | None = None) -> PromptBatch | None:
        """The next prompt batch, or None after ``timeout_s``."""
        return self._prompts.recv(timeout_s, self._control.health)

    def send_rollout(self, sample: Sample, timeout_s: float | None = None) -> None:
        """Queue one rollout; blocks under back-pressure (``BackpressureTimeout`` after the timeout)."""
        self._rollouts.send(sample, timeout_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued rollout was handed to the socket."""
        return self._rollouts.flush(timeout_s)

    def poll_weights(self) -> WeightUpdate | None:
        """The newest complete weight update not yet taken, or None (never a partial one)."""
        self._control.health()
        return self._control.weights.poll()

    def wait_weights(self, min_version: int, timeout_s: float | None = None) -> WeightUpdate | None:
        """Wait for an update with version >= ``min_version``; None if ``current_version`` already is."""
        return self._control.weights.wait(min_version, timeout_s, self._control.health)

    @property
    def current_version(self) -> int:
        """Version of the last update handed out (-1 before the first)."""
        return self._control.weights.current_version

    @property
    def shutdown_requested(self) -> bool:
        return self._control.shutdown_requested

    def check(self) -> None:
        """Raise ``ShutdownRequested`` / ``PeerDeadError`` if the trainer asked to stop or died."""
        self._control.health()
