"""Per-channel size limits, derived from the run's config instead of one global cap.

Each receiving socket gets the ``WireLimits`` of what may legitimately travel on it:

- trainer control (HELLO, HEARTBEAT, WEIGHTS_ACK, WEIGHTS_RELAYED, SHUTDOWN): a header, no tensors;
- trainer rollouts: one `Sample`, a prompt of at most ``max_prompt_tokens`` and a response of at most
  ``max_response_tokens`` tokens (int64) with, per response token, a float32 log-prob, an int64 policy
  version and a bool loss mask;
- generator prompts: at most ``max_batch_prompts`` prompts of ``max_prompt_tokens``;
- generator control: weight updates whose tensors match the model's specs exactly.

``rollout_memory_bound`` states how much memory a flood of the largest allowed rollouts
can make the trainer hold (see the README's transport section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.wire import ALLOWED_DTYPES, DTYPE_NAMES, TensorSpec, WireError, WireLimits

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


@dataclass(frozen=True)
class WeightSpecs:
    """The exact tensors a weight update carries: ``{name: (dtype name, shape)}``."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def of(cls, specs: Iterable[tuple]) -> "WeightSpecs":
        """From ``(name, shape, dtype)`` rows (dtype a ``torch.dtype`` or its name), e.g. ``state_dict_specs``."""
        out = {}
        for name, shape, dtype in specs:
            out[str(name)] = (DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), tuple(int(d) for d in shape))
        return cls(out)

    def wire_specs(self) -> tuple[TensorSpec, ...]:
        """The tensors as ``TensorSpec``s, in the order they were given."""
        return tuple(TensorSpec(name, dtype, shape, torch.Size(shape).numel() * _itemsize(dtype))
                     for name, (dtype, shape) in self.tensors.items())

    def limits(self, bucket_bytes: int) -> WireLimits:
        """Limits of one weights message (a bucket of at most the whole model, or a shared-memory header)."""
        sizes = [torch.Size(shape).numel() * _itemsize(dtype) for dtype, shape in self.tensors.values()]
        header = CONTROL_HEADER_BYTES + sum(len(name) + 64 for name in self.tensors)
        return WireLimits(max_header_bytes=header, max_tensor_bytes=max(sizes, default=0),
                          max_message_bytes=sum(sizes), max_tensors=len(sizes))

    def check_received(self, specs: Sequence[TensorSpec]) -> None:
        """Raise ``WireError("bad_weights")`` unless every spec is one of the model's, exactly."""
        for spec in specs:
            want = self.tensors.get(spec.name)
            if want is None or want != (spec.dtype, tuple(spec.shape)):
                raise WireError("bad_weights", f"tensor {spec.name!r} {spec.dtype}{list(spec.shape)}: the model has "
                                               f"{'no such tensor' if want is None else f'{want[0]}{list(want[1])}'}")

    def check_published(self, specs: Sequence[TensorSpec]) -> None:
        """Raise ``ValueError`` unless ``specs`` are exactly the model's tensors (names, dtypes, shapes)."""
        got = {s.name: (s.dtype, tuple(s.shape)) for s in specs}
        if got != self.tensors:
            missing = sorted(set(self.tensors) - set(got))[:5]
            unknown = sorted(set(got) - set(self.tensors))[:5]
            differ = [f"{n}: {got[n]} != {self.tensors[n]}" for n in got if n in self.tensors and got[n] != self.tensors[n]]
            raise ValueError(f"weight update does not match the model's specs: missing {missing}, unknown {unknown}, "
                             f"different {differ[:5]}")


def _itemsize(dtype_name: str) -> int:
    dtype = ALLOWED_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"weight dtype {dtype_name!r} is not allowed on the wire ({sorted(ALLOWED_DTYPES)})")
    return dtype.itemsize
