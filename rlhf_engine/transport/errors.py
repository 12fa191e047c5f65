"""Typed errors the transport raises to its users (never inside a receive loop)."""


class TransportError(Exception):
    """Base class of every transport error."""


class HandshakeError(TransportError):
    """The peers disagree on protocol version or model fingerprint, or the handshake timed out."""


class HandshakeTimeout(HandshakeError, TimeoutError):
    """No handshake (answer) within the timeout: also a ``TimeoutError``, to retry on."""


class PeerDeadError(TransportError):
    """No heartbeat from a peer for longer than ``heartbeat_timeout_s``."""


class BackpressureTimeout(TransportError):
    """A send waited longer than its timeout because the receiver is not consuming."""


class TransportClosed(TransportError):
    """The channel was closed locally."""


class ShutdownRequested(TransportClosed):
    """The peer asked for an orderly shutdown."""


class InsecureEndpointError(TransportError):
    """A non-loopback endpoint without CURVE keys and without the insecure opt-out."""


class EndpointInUseError(TransportError, OSError):
    """An ``ipc://`` endpoint is held by another live trainer."""


class AuthenticationFailed(HandshakeError):
    """The trainer's CURVE/ZAP handler refused this generator's key."""
