"""Prompt batches, trainer -> generators: PUSH (the trainer binds) -> PULL (generators connect).

Queues are small (``prompt_queue_size``), so a generator effectively pulls: the trainer's
``send`` blocks until a generator has room, and the data position stays with the trainer.
ZeroMQ hands batches round-robin to the connected generators. Nothing here de-duplicates
batches: the trainer may send a batch holding a subset of an earlier batch's prompts again
(a re-issue, after a generator was lost or a batch went missing).
"""

from __future__ import annotations

import zmq

from rlhf_engine.transport.channel import RecvChannel, SendChannel
from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.endpoints import Security, channel_endpoint, open_socket
from rlhf_engine.transport.limits import prompt_limits
from rlhf_engine.transport.messages import PromptBatch
from rlhf_engine.transport.wire import PromptsHeader, WireError


class PromptSender:
    """Trainer side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, sender_id: str, security: Security,
                 health=lambda: None) -> None:
        self._config = config
        self._sender_id = sender_id
        sock = open_socket(context, zmq.PUSH, channel_endpoint(config.endpoint, "prompts"), bind=True,
                           security=security, config=config, limits=prompt_limits(config), hwm=config.prompt_queue_size)
        self._channel = SendChannel("prompts-send", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, blocked_log_s=config.blocked_log_s, health=health)
        self._channel.start()

    def send(self, batch: PromptBatch, timeout_s: float | None = None) -> None:
        """Queue ``batch``; ``ValueError`` if it exceeds what generators accept (see ``prompt_limits``)."""
        config = self._config
        if len(batch.prompts) > config.max_batch_prompts:
            raise ValueError(f"batch {batch.batch_id} has {len(batch.prompts)} prompts; "
                             f"transport.max_batch_prompts is {config.max_batch_prompts}")
        longest = max((len(p) for p in batch.prompts), default=0)
        if longest > config.max_prompt_tokens:
            raise ValueError(f"batch {batch.batch_id} has a prompt of {longest} tokens; "
                             f"transport.max_prompt_tokens is {config.max_prompt_tokens}")
        timeout = config.send_timeout_s if timeout_s is None else timeout_s
        self._channel.send(lambda seq: batch.to_wire(self._sender_id, seq), timeout)

    @property
    def stats(self):
        return self._channel.stats

    def check(self) -> None:
        """Raise if the IO thread failed or the channel is closed."""
        self._channel.check()

    def close(self) -> bool:
        return self._channel.close()


class PromptReceiver:
    """Generator side."""

    def __init__(self, context: zmq.Context, config: TransportConfig, security: Security) -> None:
        limits = prompt_limits(config)
        sock = open_socket(context, zmq.PULL, channel_endpoint(config.endpoint, "prompts"), bind=False,
                           security=security, config=config, limits=limits, hwm=config.prompt_queue_size)
        self._channel = RecvChannel("prompts-recv", sock, queue_size=config.prompt_queue_size,
                                    linger_ms=config.linger_ms, limits=limits, accept=self._accept,
                                    drop_log_interval_s=config.drop_log_interval_s)
        self._channel.start()

    @staticmethod
    def _accept(header, tensors, user_id) -> PromptBatch:
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
