"""Prompt batches, trainer -> generators: PUSH (the trainer binds) -> PULL (generators connect).

Queues are small (``prompt_queue_size``), so a generator effectively pulls: the trainer's
``send`` blocks until a generator has room, and the data position stays with the trainer.
ZeroMQ hands batches round-robin to the connected generators.
"""

from __future__ import annotations

import zmq

from rlhf_engine.transport.channel import RecvChannel, SendChannel
from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.messages import PromptBatch
from rlhf_engine.transport.wire import PromptsHeader, WireError


class PromptSender:
    """Trainer side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, sender_id: str, security: Security,
                 health=lambda: None) -> None:
        self._config = config
        self._sender_id = sender_id
        sock = open_socket(context, zmq.PUSH, channel_endpoint(config.endpoint, "prompts"), bind=True,
                           security=security, config=config, hwm=config.prompt_queue_size)
        self._channel = SendChannel("prompts-send", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, blocked_log_s=config.blocked_log_s, health=health)
        self._channel.start()

    def send(self, batch: PromptBatch, timeout_s: float | None = None) -> None:
        timeout = self._config.send_timeout_s if timeout_s is None else timeout_s
        self._channel.send(lambda seq: batch.to_wire(self._sender_id, seq), timeout)

    @property
    def stats(self):
        return self._channel.stats

    def close(self) -> bool:
        return self._channel.close()


class PromptReceiver:
    """Generator side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, security: Security) -> None:
        sock = open_socket(context, zmq.PULL, channel_endpoint(config.endpoint, "prompts"), bind=False,
                           security=security, config=config, hwm=config.prompt_queue_size)
        self._channel = RecvChannel("prompts-recv", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, limits=config.limits, accept=self._accept)
        self._channel.start()

    @staticmethod
    def _accept(header, tensors) -> PromptBatch:
        if not isinstance(header, PromptsHeader):
            raise WireError("wrong_kind", f"{type(header).__name__} on the prompt channel")
        return PromptBatch.from_wire(header, tensors)

    def recv(self, timeout_s: float | None = None, health=lambda: None) -> PromptBatch | None:
        return self._channel.get(timeout_s, health)

    @property
    def stats(self):
        return self._channel.stats

    def close(self) -> bool:
        return self._channel.close()
