"""Transport settings: one validated dataclass shared by both ends."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_engine.transport.wire import WireLimits


@dataclass
class TransportConfig:
    """How the trainer and its generators talk. Both ends should use the same values."""

    endpoint: str = "ipc:///tmp/rlhf-engine"
    """Base endpoint. ``ipc://PATH`` uses ``PATH.{control,rollouts,prompts}``;
    ``tcp://HOST:PORT`` uses ports PORT (control), PORT+1 (rollouts), PORT+2 (prompts)."""
    rollout_queue_size: int = 256
    """Rollouts buffered in-process on each side (plus ``rollout_hwm`` in each socket)."""
    rollout_hwm: int = 64
    """ZeroMQ high-water mark (messages) of the rollout sockets."""
    prompt_queue_size: int = 2
    """Prompt batches buffered on each side; small so the trainer's data position stays near."""
    send_timeout_s: float = 300.0
    """Default longest wait of a blocking send before ``BackpressureTimeout``."""
    blocked_log_s: float = 5.0
    """A send blocked this long logs a warning naming the back-pressure."""
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    """A peer silent this long is dead (``PeerDeadError``)."""
    handshake_timeout_s: float = 30.0
    linger_ms: int = 200
    """ZeroMQ linger on close: messages still queued after this are dropped."""
    bucket_bytes: int = 256 << 20
    """Weight updates over tcp are split into buckets of about this many bytes."""
    weights_via_shm: bool | None = None
    """Same-host weight updates through shared memory; None = yes for ``ipc://`` endpoints."""
    shm_dir: str = "/dev/shm"
    shm_buffers: int = 2
    """Shared-memory buffers the trainer may hold (one being read, one being written)."""
    ack_timeout_s: float = 120.0
    """Longest wait for generators to release a shared-memory buffer."""
    curve_keys_dir: str | None = None
    """Folder written by ``rlhf-engine keys``: enables CURVE encryption and authentication."""
    allow_insecure: bool = False
    """Permit a non-loopback endpoint without CURVE (logs a warning)."""
    limits: WireLimits = field(default_factory=WireLimits)

    def __post_init__(self) -> None:
        for name in ("rollout_queue_size", "rollout_hwm", "prompt_queue_size", "bucket_bytes", "shm_buffers"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransportConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("send_timeout_s", "heartbeat_interval_s", "heartbeat_timeout_s", "handshake_timeout_s", "ack_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransportConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.linger_ms < 0:
            raise ValueError(f"TransportConfig.linger_ms must be >= 0, got {self.linger_ms}")
        if not self.endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"endpoint must start with ipc:// or tcp://, got {self.endpoint!r}")

    @property
    def use_shm(self) -> bool:
        if self.weights_via_shm is None:
            return self.endpoint.startswith("ipc://")
        return self.weights_via_shm
