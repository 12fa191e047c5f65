"""Transport settings: one validated dataclass shared by both ends.

Per-channel size limits, derived from the run's config instead of one global cap.

Each receiving socket gets the ``WireLimits`` of what may legitimately travel on it:

- trainer control (HELLO, HEARTBEAT, WEIGHTS_ACK, WEIGHTS_RELAYED, SHUTDOWN): a header, no tensors;
- trainer rollouts: one `Sample`, a prompt of at most ``max_prompt_tokens`` and a response of at most
  ``max_response_tokens`` tokens (int64) with, per response token, a float32 log-prob, an int64 policy
  version and a bool loss mask, and its turn starts;
- generator prompts: at most ``max_batch_prompts`` prompts of ``max_prompt_tokens``;
- generator control: weight updates whose tensors match the model's specs exactly (`weights.WeightSpecs`).

``rollout_memory_bound`` states how much memory a flood of the largest allowed rollouts
can make the trainer hold (see the README's transport section).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from rlhf_engine.transport.wire import WireLimits

CHANNELS = ("control", "rollouts", "prompts")
"""The channels of one base endpoint, in port order (see `TransportConfig.endpoint`)."""
IPC_DIR_PREFIX = "rlhf-engine-"
"""The private directory of `endpoint=None`: `mkdtemp(prefix=IPC_DIR_PREFIX)` (8 random characters after it)."""
SOCKET_NAME = "engine"
"""The base socket name in that directory."""
IPC_PATH_MAX = 107
"""Longest path a Unix socket takes (Linux: `sockaddr_un.sun_path` holds 108 bytes with the closing NUL)."""


@dataclass
class TransportConfig:
    """How the trainer and its generators talk. Both ends should use the same values."""

    endpoint: str | None = None
    """Base endpoint. ``ipc://PATH`` uses ``PATH.{control,rollouts,prompts}``;
    ``tcp://HOST:PORT`` uses ports PORT (control), PORT+1 (rollouts), PORT+2 (prompts).
    None (trainer only): a fresh private directory (mode 0700) under ``ipc_dir``, removed on
    close; the trainer port's ``endpoint`` says where, for the generators' ``--connect``.
    An ipc socket path has at most 107 characters (``PATH.rollouts`` is the longest): a longer one is a
    config error."""
    ipc_dir: str | None = None
    """Where the private directory of ``endpoint=None`` is made (None: the system temp dir); its longest socket
    path, ``<ipc_dir>/rlhf-engine-XXXXXXXX/engine.rollouts``, must fit the same 107 characters."""
    max_prompt_tokens: int = 2048
    """Longest prompt on the wire; the run config sets it to ``data.max_prompt_length``."""
    max_response_tokens: int = 2048
    """Longest response on the wire; the run config sets it to ``ppo.response_length``."""
    max_batch_prompts: int = 4096
    """Most prompts in one prompt batch; the run config sets it to the prompts per step."""
    rollout_queue_size: int = 256
    """Rollouts buffered in-process on each side (plus ``rollout_hwm`` in each socket)."""
    rollout_queue_bytes: int = 64 << 20
    """Bytes of rollouts buffered in-process on the trainer (whichever bound comes first)."""
    rollout_hwm: int = 64
    """ZeroMQ high-water mark (messages) of the rollout sockets, per connected peer."""
    prompt_queue_size: int = 2
    """Prompt batches buffered on each side; small so the trainer's data position stays near."""
    send_timeout_s: float = 300.0
    """Default longest wait of a blocking send before ``BackpressureTimeout``."""
    blocked_log_s: float = 5.0
    """A send blocked this long logs a warning naming the back-pressure."""
    drop_log_interval_s: float = 10.0
    """Dropped messages are logged at most once per reason per interval, with their count."""
    heartbeat_interval_s: float = 1.0
    """Both ends send a heartbeat this often; any message counts as a sign of life."""
    heartbeat_timeout_s: float = 10.0
    """A peer silent this long is lost (the trainer drops it from the roster; a generator
    raises ``PeerDeadError``)."""
    handshake_timeout_s: float = 30.0
    """A generator's longest wait for the trainer's answer to its handshake (then ``HandshakeTimeout``); also
    the trainer's default wait for its generators to connect."""
    linger_ms: int = 200
    """ZeroMQ linger on close: messages still queued after this are dropped."""
    bucket_bytes: int = 256 << 20
    """Weight updates over tcp are split into buckets of about this many bytes."""
    weights_via_shm: bool | None = None
    """Same-host weight updates through shared memory. None (auto): the trainer offers them on ``ipc://``
    endpoints only; a generator can take them (from the trainer on its host, or from the relay leader of its
    host, see ``relay``) on any endpoint. False: never (a generator then always gets socket frames)."""
    shm_dir: str = "/dev/shm"
    """Where shared-memory files are made (weight buffers, a relay leader's copies, a vLLM generator's staging
    files); the trainer and the generators of a host must use the same one."""
    shm_buffers: int = 2
    """Shared-memory buffers the trainer may hold (one being read, one being written); also those of a relay
    leader (``relay``)."""
    ack_timeout_s: float = 120.0
    """Longest wait of a publish for a free shared-memory buffer; the generators that still hold the
    oldest one then are dropped from the roster (they never acked that update). Also the longest wait
    for a relay leader to relay an update (see ``relay``) before its host's peers get frames."""
    relay: bool = True
    """Trainer: generators on socket frames that share a host and can use shared memory (their own
    ``weights_via_shm``) get one copy per host: one of them (the relay leader) receives the frames and
    hands the update to the others through its shared memory. False: one copy per generator."""
    curve_keys_dir: str | None = None
    """Folder written by ``rlhf-engine keys``: enables CURVE encryption and authentication.
    The trainer accepts only the client public keys in it (``client.key``, ``clients/*.key``)."""
    curve_client_key: str | None = None
    """A generator's own secret key file (default: ``client.key_secret`` in ``curve_keys_dir``)."""
    allow_insecure: bool = False
    """Permit a ``tcp://`` endpoint (loopback included) without CURVE (logs a warning): anyone
    who can reach the port can then join as a generator, read prompts and weights, and send rollouts."""

    def __post_init__(self) -> None:
        for name in ("rollout_queue_size", "rollout_queue_bytes", "rollout_hwm", "prompt_queue_size", "bucket_bytes",
                     "shm_buffers", "max_prompt_tokens", "max_response_tokens", "max_batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransportConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("send_timeout_s", "heartbeat_interval_s", "heartbeat_timeout_s", "handshake_timeout_s",
                     "ack_timeout_s", "drop_log_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransportConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if not isinstance(self.relay, bool):
            raise ValueError(f"TransportConfig.relay must be true or false, got {self.relay!r}")
        if self.linger_ms < 0:
            raise ValueError(f"TransportConfig.linger_ms must be >= 0, got {self.linger_ms}")
        if self.endpoint is not None and not self.endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"endpoint must start with ipc:// or tcp://, got {self.endpoint!r}")
        self._check_socket_paths()

    def _check_socket_paths(self) -> None:
        """Every ipc channel's socket path fits a Unix socket (else binding fails once the run has started)."""
        suffix = 1 + max(len(c) for c in CHANNELS)  # ".rollouts"
        if self.endpoint is not None and self.endpoint.startswith("ipc://"):
            field, value = "endpoint", self.endpoint
            longest = len(self.endpoint) - len("ipc://") + suffix
        elif self.endpoint is None:
            field, value = "ipc_dir", self.ipc_dir or tempfile.gettempdir()
            longest = len(value) + len(f"/{IPC_DIR_PREFIX}12345678/{SOCKET_NAME}") + suffix
        else:
            return
        if longest > IPC_PATH_MAX:
            raise ValueError(f"transport.{field} {value!r} is too long for its sockets: their paths would have up to "
                             f"{longest} characters, a Unix socket takes {IPC_PATH_MAX}; use a shorter path")

    @property
    def use_shm(self) -> bool:
        """Trainer: it publishes through shared memory to the generators on its host."""
        if self.weights_via_shm is None:
            return self.endpoint is None or self.endpoint.startswith("ipc://")
        return self.weights_via_shm

    @property
    def generator_shm(self) -> bool:
        """Generator: it can map shared-memory files of its host (the trainer's, its relay leader's) and,
        as a relay leader, write them."""
        return self.weights_via_shm is not False


CONTROL_HEADER_BYTES = 64 << 10
"""Largest control header (HELLO, heartbeat, ack, relayed, goodbye: names, a path and a reason string)."""
RECORD_HEADER_BYTES = 8 << 10
"""Largest rollout header beyond its tensors' specs (ids, a finish reason and a truncation reason of <= 256
characters, an episode's <= 16 metrics)."""
TOKEN_BYTES = 8  # int64
LOGPROB_BYTES = 4  # float32
VERSION_BYTES = 8  # int64
MASK_BYTES = 1  # bool
TURN_BYTES = 8  # int64, at most one turn start per response token
ROLLOUT_TENSORS = 6
"""Frames of a rollout message (`messages.SAMPLE_TENSORS`)."""
RECORD_JSON_BYTES = 16 << 10
"""Largest dataset record (JSON) a prompt batch carries per prompt for the environment's `reset`."""

CONTROL_LIMITS = WireLimits(max_header_bytes=CONTROL_HEADER_BYTES, max_tensor_bytes=0, max_message_bytes=0,
                            max_tensors=0)
"""What the trainer accepts on its control socket: headers only."""


def rollout_limits(config: TransportConfig) -> WireLimits:
    """Limits of one rollout. A single frame may hold up to ``P + R`` tokens so that a rollout a few
    tokens too long is still decoded and dropped with a count (``rollout_too_large``) rather than
    cutting the sender's connection; the message total is exact."""
    p, r = config.max_prompt_tokens, config.max_response_tokens
    return WireLimits(max_header_bytes=RECORD_HEADER_BYTES, max_tensor_bytes=TOKEN_BYTES * (p + r),
                      max_message_bytes=TOKEN_BYTES * (p + r)
                      + (LOGPROB_BYTES + VERSION_BYTES + MASK_BYTES + TURN_BYTES) * r,
                      max_tensors=ROLLOUT_TENSORS)


def prompt_limits(config: TransportConfig) -> WireLimits:
    """Limits of one prompt batch: tokens ``[sum P_i]`` and offsets ``[B + 1]`` (int64), and in the header
    each prompt's id and (with an environment) its record."""
    b, p = config.max_batch_prompts, config.max_prompt_tokens
    tokens, offsets = TOKEN_BYTES * b * p, TOKEN_BYTES * (b + 1)
    return WireLimits(max_header_bytes=RECORD_HEADER_BYTES + (24 + RECORD_JSON_BYTES) * b,
                      max_tensor_bytes=max(tokens, offsets),
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
