"""Per-channel size limits, derived from the run's config instead of one global cap.

Each receiving socket gets the ``WireLimits`` of what may legitimately travel on it:

- trainer control (HELLO, HEARTBEAT, WEIGHTS_ACK, WEIGHTS_RELAYED, SHUTDOWN): a header, no tensors;
- trainer rollouts: one `Sample`, a prompt of at most ``max_prompt_tokens`` and a response of at most
  ``max_response_tokens`` tokens (int64) with, per response token, a float32 log-prob, an int64 policy
  version and a bool loss mask;
- generator prompts: at most ``max_batch_prompts`` prompts of ``max_prompt_tokens``;
- generator control: weight updates whose tensors match the model's specs exactly (`weights.WeightSpecs`).

``rollout_memory_bound`` states how much memory a flood of the largest allowed rollouts
can make the trainer hold (see the README's transport section).
"""

from __future__ import annotations

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.wire import WireLimits

CONTROL_HEADER_BYTES = 64 << 10
"""Largest control header (HELLO, heartbeat, ack, relayed, goodbye: names, a path and a reason string)."""
RECORD_HEADER_BYTES = 8 << 10
"""Largest rollout header beyond its tensors' specs (ids and a finish reason of <= 256 characters)."""
TOKEN_BYTES = 8  # int64
LOGPROB_BYTES = 4  # float32
VERSION_BYTES = 8  # int64
MASK_BYTES = 1  # bool
ROLLOUT_TENSORS = 5
"""Frames of a rollout message (`messages.SAMPLE_TENSORS`)."""

CONTROL_LIMITS = WireLimits(max_header_bytes=CONTROL_HEADER_BYTES, max_tensor_bytes=0, max_message_bytes=0,
                            max_tensors=0)
"""What the trainer accepts on its control socket: headers only."""


def rollout_limits(config: TransportConfig) -> WireLimits:
    """Limits of one rollout. A single frame may hold up to ``P + R`` tokens so that a rollout a few
    tokens too long is still decoded and dropped with a count (``rollout_too_large``) rather than
    cutting the sender's connection; the message total is exact."""
    p, r = config.max_prompt_tokens, config.max_response_tokens
    return WireLimits(max_header_bytes=RECORD_HEADER_BYTES, max_tensor_bytes=TOKEN_BYTES * (p + r),
                      max_message_bytes=TOKEN_BYTES * (p + r) + (LOGPROB_BYTES + VERSION_BYTES + MASK_BYTES) * r,
                      max_tensors=ROLLOUT_TENSORS)


def prompt_limits(config: TransportConfig) -> WireLimits:
    """Limits of one prompt batch: tokens ``[sum P_i]`` and offsets ``[B + 1]`` (int64)."""
    b, p = config.max_batch_prompts, config.max_prompt_tokens
    tokens, offsets = TOKEN_BYTES * b * p, TOKEN_BYTES * (b + 1)
    return WireLimits(max_header_bytes=RECORD_HEADER_BYTES + 24 * b, max_tensor_bytes=max(tokens, offsets),
                      max_message_bytes=tokens + offsets, max_tensors=2)


def rollout_memory_bound(config: TransportConfig, generators: int) -> int:
    """Bytes the trainer can hold for rollouts at most: its queue (``rollout_queue_bytes``, or
    ``rollout_queue_size`` largest rollouts if smaller), plus per connected generator the ZeroMQ
    pipe (``rollout_hwm`` messages) and one message being read, plus the one its IO thread holds.
    A protocol-conforming message (a header and five tensor frames) is at most
    ``max_header_bytes + 5 * max_frame_bytes`` while ZeroMQ holds it."""
    limits = rollout_limits(config)
    queued = min(config.rollout_queue_bytes, config.rollout_queue_size * limits.max_message_bytes)
    in_flight = limits.max_header_bytes + ROLLOUT_TENSORS * limits.max_frame_bytes
    return queued + (generators * (config.rollout_hwm + 1) + 1) * in_flight
