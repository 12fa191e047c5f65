"""The wire format: the one place that says what travels between trainer and generators.

A message is a list of ZeroMQ frames::

    frame 0       header: msgpack map encoded by msgspec, one of the ``*Header`` structs
                  below, picked by its integer ``kind`` tag (``MessageKind``)
    frame 1..N    one raw frame per entry of ``header.tensors``, in order: the tensor's
                  bytes, C-contiguous, native little-endian, exactly ``nbytes`` long

Every header carries ``kind``, ``version`` (``PROTOCOL_VERSION``), ``sender`` (the
sending process's id), ``seq`` (per sender, strictly increasing) and ``tensors``
(``TensorSpec``: name, dtype name, shape, nbytes). Nothing is pickled, nothing is
executed: a header decodes only into the structs below, and a tensor frame is only
ever viewed as one of ``ALLOWED_DTYPES``.

Receiving validates everything before use (``decode``): header size, known kind, the
protocol version, frame count, dtype allow-list, ``nbytes == itemsize * prod(shape)``,
each frame's length == its spec's ``nbytes``, and per-tensor / per-message size limits.
A failure raises ``WireError`` carrying a short ``reason`` (the counter key) and a
detail; receive loops catch it, log it, count it and drop the message.
The tensors ``decode`` returns own their memory: each is copied out of its frame, which
is read-only memory of libzmq's (writing to a received tensor changes no other message).

The handshake structs (``HelloHeader``, ``WelcomeHeader``, ``RejectHeader``) keep their
layout across protocol versions so that a peer speaking another version gets a clear
rejection instead of a decode error. Same-host weight updates travel through shared
memory: ``WeightsHeader.shm_path`` names a file that holds the tensors at ``offsets``;
then no tensor frames follow.

Relay (generators on another host, ``relay.py``): the trainer sends the frames of an update
to one generator per host with ``WeightsHeader.relay`` set. That leader copies the complete
update into a shared-memory file of its own, the tensors in the order of the headers' specs at
``shm.layout`` offsets, and answers ``WEIGHTS_RELAYED`` (its path and size, or why not). The
trainer then sends each other generator of that host a shared-memory ``WeightsHeader`` for that
file, with the trainer's own specs and offsets (never the leader's); each acks to the trainer as
usual (``refused``: the file failed its checks; the update then comes as frames). Once all have
acked, ``WEIGHTS_RELEASE`` lets the leader reuse the file.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence, Union

import msgspec
import numpy as np
import torch

from rlhf_engine.common.dtypes import DTYPE_NAMES, TORCH_DTYPES

PROTOCOL_VERSION = 6
"""3: evaluation batches (`PromptsHeader.eval_samples`, `RolloutHeader.eval`). 4: a rollout carries one
`rlhf_engine.data.samples.Sample`: `sample_id`, per-token `policy_versions` and `loss_mask` frames. 5: episodes
(records, turn starts, episode fields). 6: per-prompt response budgets (`PromptsHeader.max_new_tokens`)."""


class MessageKind(enum.IntEnum):
    HELLO = 1  # generator -> trainer: protocol version, model fingerprint
    WELCOME = 2  # trainer -> generator: handshake accepted
    REJECT = 3  # trainer -> generator: handshake refused, with the reason
    HEARTBEAT = 4  # both ways, every heartbeat_interval_s
    ROLLOUT = 5  # generator -> trainer: one completion
    PROMPTS = 6  # trainer -> generator: a batch of prompts
    WEIGHTS = 7  # trainer -> generator: one bucket of a versioned weight update
    WEIGHTS_ACK = 8  # generator -> trainer: a version was taken (or skipped)
    SHUTDOWN = 9  # both ways: orderly goodbye
    WEIGHTS_RELAYED = 10  # generator (its host's relay leader) -> trainer: its shared-memory copy of a version
    WEIGHTS_RELEASE = 11  # trainer -> relay leader: every peer took that copy; the file may be reused


ALLOWED_DTYPES = TORCH_DTYPES  # the wire carries exactly the dtypes the project names
MAX_NDIM = 8
MAX_PATH_CHARS = 4096
"""Longest shared-memory path in a header (Linux PATH_MAX)."""
MAX_REASON_CHARS = 1024


@dataclass(frozen=True)
class WireLimits:
    """Size limits of one channel, checked on every received message before its tensors are used;
    ``max_frame_bytes`` is also the socket's MAXMSGSIZE (a larger frame is never allocated:
    ZeroMQ drops the connection that sends it). ``config.py`` derives them from the config."""

    max_header_bytes: int = 1 << 20
    """Largest accepted header frame (msgpack)."""
    max_tensor_bytes: int = 8 << 30
    """Largest accepted single tensor."""
    max_message_bytes: int = 16 << 30
    """Largest accepted sum of tensor bytes in one message."""
    max_tensors: int = 65536
    """Most tensors in one message."""

    def __post_init__(self) -> None:
        if self.max_header_bytes <= 0:
            raise ValueError(f"WireLimits.max_header_bytes must be > 0, got {self.max_header_bytes}")
        for name in ("max_tensor_bytes", "max_message_bytes", "max_tensors"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"WireLimits.{name} must be >= 0, got {value}")

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a socket with these limits accepts (its ZeroMQ MAXMSGSIZE)."""
        return max(self.max_header_bytes, self.max_tensor_bytes)


class WireError(Exception):
    """A received message is malformed; ``reason`` is the short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class _Base(msgspec.Struct, tag_field="kind", kw_only=True, forbid_unknown_fields=True):
    version: int = PROTOCOL_VERSION
    sender: str
    seq: int
    tensors: tuple[TensorSpec, ...] = ()


class HelloHeader(_Base, tag=int(MessageKind.HELLO)):
    fingerprint: str
    hostname: str
    shm: bool
    """The generator can map the trainer's shared-memory files (same host)."""


class WelcomeHeader(_Base, tag=int(MessageKind.WELCOME)):
    shm: bool
    """Weight updates will come through shared memory."""


class RejectHeader(_Base, tag=int(MessageKind.REJECT)):
    reason: str


class HeartbeatHeader(_Base, tag=int(MessageKind.HEARTBEAT)):
    pass


class RolloutHeader(_Base, tag=int(MessageKind.ROLLOUT)):
    """One `Sample`: these fields beside its tensors (`transport.messages.SAMPLE_TENSORS`)."""

    sample_id: str
    prompt_id: int
    finish_reason: str
    generation_time: float
    finished_at: float = 0.0
    eval: bool = False
    """A completion of an evaluation batch: scored and logged, never trained on."""
    reward: float | None = None
    """The environment's reward of the episode (`Sample.reward`)."""
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    env_seconds: float = 0.0
    truncated: str = ""
    metrics: dict[str, float] = {}
    """`Sample.episode` (`EpisodeInfo`), field by field."""


class PromptsHeader(_Base, tag=int(MessageKind.PROMPTS)):
    batch_id: int
    prompt_ids: tuple[int, ...]
    min_policy_version: int
    eval_samples: int = 0
    """0: a training batch (the generator's own sampling); n > 0: an evaluation batch, n completions per prompt
    at ``eval_temperature`` (0: greedy), its rollouts tagged ``eval``."""
    eval_temperature: float = 0.0
    records: tuple[str, ...] = ()
    """With an environment (`generator.environment`): each prompt's dataset record as JSON text, for the
    environment's `reset`; empty otherwise."""
    max_new_tokens: tuple[int, ...] = ()
    """Each prompt's most response tokens (`data.max_new_tokens_field`); empty: the generator's own."""


class WeightsHeader(_Base, tag=int(MessageKind.WEIGHTS)):
    weight_version: int
    bucket: int
    num_buckets: int
    shm_path: str = ""
    """Non-empty: tensors live in this shared-memory file at ``offsets``; no frames follow."""
    shm_size: int = 0
    offsets: tuple[int, ...] = ()
    relay: bool = False
    """The receiver is its host's relay leader: once the update is complete it copies it into shared
    memory of its own and answers ``WeightsRelayedHeader`` (frames only, never with ``shm_path``)."""


class WeightsAckHeader(_Base, tag=int(MessageKind.WEIGHTS_ACK)):
    weight_version: int
    applied: bool
    """False when the version was skipped (a newer one arrived first)."""
    refused: bool = False
    """The update's shared-memory file failed its checks: not taken, it must come another way."""


class WeightsRelayedHeader(_Base, tag=int(MessageKind.WEIGHTS_RELAYED)):
    weight_version: int
    shm_path: str = ""
    """The leader's file that holds the update (tensors in the order of its specs, at ``shm.layout``
    offsets); "" when it did not relay it."""
    shm_size: int = 0
    reason: str = ""
    """Why it did not relay (``shm_path`` empty), e.g. all its relay buffers are held."""


class WeightsReleaseHeader(_Base, tag=int(MessageKind.WEIGHTS_RELEASE)):
    weight_version: int
    shm_path: str
    """The leader's file of ``weight_version``: every peer acked it (or left)."""


class ShutdownHeader(_Base, tag=int(MessageKind.SHUTDOWN)):
    reason: str = ""


Header = Union[
    HelloHeader,
    WelcomeHeader,
    RejectHeader,
    HeartbeatHeader,
    RolloutHeader,
    PromptsHeader,
    WeightsHeader,
    WeightsAckHeader,
    ShutdownHeader,
    WeightsRelayedHeader,
    WeightsReleaseHeader,
]


class _Preamble(msgspec.Struct):
    """Just enough of any header to check kind and version before the full decode."""

    kind: int
    version: int


_ENCODER = msgspec.msgpack.Encoder()
_PREAMBLE = msgspec.msgpack.Decoder(_Preamble)
_DECODER = msgspec.msgpack.Decoder(Header)
_HANDSHAKE_KINDS = (MessageKind.HELLO, MessageKind.WELCOME, MessageKind.REJECT)


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec of ``tensor`` as it will travel (its dtype must be in ``ALLOWED_DTYPES``)."""
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}; the wire allows {sorted(ALLOWED_DTYPES)}")
    return TensorSpec(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies only if it is not contiguous)."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    flat = tensor.contiguous().reshape(-1)  # [numel]
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def encode(header: Header, tensors: Sequence[torch.Tensor] = ()) -> list:
    """Frames for ``header`` and its tensors (``header.tensors`` must describe ``tensors``;
    a shared-memory weights header describes tensors that travel outside the message)."""
    in_shm = isinstance(header, WeightsHeader) and bool(header.shm_path)
    if len(tensors) != (0 if in_shm else len(header.tensors)):
        raise ValueError(f"header lists {len(header.tensors)} tensors but {len(tensors)} were given")
    return [_ENCODER.encode(header), *(tensor_bytes(t) for t in tensors)]


def _frame_view(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


def decode_header(data, limits: WireLimits) -> Header:
    """Decode and check one header frame (raises ``WireError``)."""
    view = _frame_view(data)
    if view.nbytes > limits.max_header_bytes:
        raise WireError("header_too_large", f"{view.nbytes} bytes > max_header_bytes {limits.max_header_bytes}")
    try:
        pre = _PREAMBLE.decode(view)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise WireError("bad_header", str(e)) from None
    if pre.kind not in MessageKind._value2member_map_:
        raise WireError("unknown_kind", f"kind {pre.kind}")
    if pre.version != PROTOCOL_VERSION and MessageKind(pre.kind) not in _HANDSHAKE_KINDS:
        raise WireError("bad_version", f"protocol version {pre.version}, expected {PROTOCOL_VERSION}")
    try:
        header = _DECODER.decode(view)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise WireError("bad_header", str(e)) from None
    if header.seq < 0:
        raise WireError("bad_header", f"negative seq {header.seq}")
    _check_fields(header)
    return header


def _check_fields(header: Header) -> None:
    """The rules of the weight headers' fields that their types do not say (raises ``WireError``)."""
    if isinstance(header, (WeightsHeader, WeightsAckHeader, WeightsRelayedHeader, WeightsReleaseHeader)) \
            and header.weight_version < 0:
        raise WireError("bad_header", f"negative weight_version {header.weight_version}")
    if isinstance(header, WeightsAckHeader) and header.refused and header.applied:
        raise WireError("bad_header", "an update both refused and applied")
    if isinstance(header, WeightsHeader) and header.relay and header.shm_path:
        raise WireError("bad_header", "a relay request carries frames, not a shared-memory path")
    if isinstance(header, (WeightsHeader, WeightsRelayedHeader, WeightsReleaseHeader)) \
            and len(header.shm_path) > MAX_PATH_CHARS:
        raise WireError("bad_header", f"shm_path of {len(header.shm_path)} characters > {MAX_PATH_CHARS}")
    if isinstance(header, WeightsRelayedHeader):
        if header.shm_size < 0 or bool(header.shm_path) != (header.shm_size > 0):
            raise WireError("bad_header", f"relayed shm_path {header.shm_path[:80]!r} with shm_size {header.shm_size}")
        if header.tensors or len(header.reason) > MAX_REASON_CHARS:
            raise WireError("bad_header", "a relayed header has no tensors and a reason of at most "
                                          f"{MAX_REASON_CHARS} characters")


def check_spec(spec: TensorSpec, limits: WireLimits) -> torch.dtype:
    """Validate one tensor spec against the allow-list and limits; returns its dtype."""
    dtype = ALLOWED_DTYPES.get(spec.dtype)
    if dtype is None:
        raise WireError("bad_dtype", f"tensor {spec.name!r} dtype {spec.dtype!r}")
    if len(spec.shape) > MAX_NDIM or any(d < 0 for d in spec.shape):
        raise WireError("bad_shape", f"tensor {spec.name!r} shape {spec.shape}")
    expected = math.prod(spec.shape) * dtype.itemsize
    if spec.nbytes != expected:
        raise WireError("bad_nbytes", f"tensor {spec.name!r}: nbytes {spec.nbytes} != {expected} for {spec.dtype}{list(spec.shape)}")
    if spec.nbytes > limits.max_tensor_bytes:
        raise WireError("tensor_too_large", f"tensor {spec.name!r}: {spec.nbytes} > max_tensor_bytes {limits.max_tensor_bytes}")
    return dtype


def check_specs(specs: Sequence[TensorSpec], limits: WireLimits) -> list[torch.dtype]:
    """Validate every spec of a message and their total size."""
    if len(specs) > limits.max_tensors:
        raise WireError("too_many_tensors", f"{len(specs)} > max_tensors {limits.max_tensors}")
    dtypes = [check_spec(s, limits) for s in specs]
    total = sum(s.nbytes for s in specs)
    if total > limits.max_message_bytes:
        raise WireError("message_too_large", f"{total} bytes > max_message_bytes {limits.max_message_bytes}")
    return dtypes


def owned_tensor(frame: memoryview, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of its own holding ``frame``'s bytes (one copy). A received ZeroMQ frame is read-only memory that
    libzmq owns (and may share): a tensor over it could be written through by whoever gets it, so none escapes."""
    out = torch.empty(spec.nbytes, dtype=torch.uint8)
    if spec.nbytes:
        out.numpy()[:] = np.frombuffer(frame, dtype=np.uint8)
    return out.view(dtype).view(spec.shape)


def decode(frames: Sequence, limits: WireLimits) -> tuple[Header, list[torch.Tensor]]:
    """Validate a received message and copy its tensors out of the frames (raises ``WireError``): each
    returned tensor owns writable memory of its own (``owned_tensor``).

    Shared-memory weight headers carry no tensor frames; their tensors are viewed by
    the weights channel after it has checked the file (see ``shm.py``).
    """
    if not frames:
        raise WireError("no_frames", "empty message")
    header = decode_header(frames[0], limits)
    dtypes = check_specs(header.tensors, limits)
    if isinstance(header, WeightsHeader) and header.shm_path:
        if len(frames) != 1:
            raise WireError("frame_count", f"shared-memory weights header followed by {len(frames) - 1} frames")
        return header, []
    if len(frames) != 1 + len(header.tensors):
        raise WireError("frame_count", f"{len(frames) - 1} tensor frames for {len(header.tensors)} specs")
    tensors = []
    for spec, dtype, frame in zip(header.tensors, dtypes, frames[1:]):
        view = _frame_view(frame)
        if view.nbytes != spec.nbytes:
            raise WireError("frame_length", f"tensor {spec.name!r}: frame {view.nbytes} bytes, spec {spec.nbytes}")
        tensors.append(owned_tensor(view, spec, dtype))
    return header, tensors
