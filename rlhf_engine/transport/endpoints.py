"""Endpoint names per channel, socket security (CURVE + a ZAP allow-list) and socket setup.

Only our peers talk to us: every ``tcp://`` endpoint, loopback included, needs CURVE keys
(``transport.curve_keys_dir``) unless ``allow_insecure`` is set. With keys, the trainer runs a
ZAP handler that accepts only the client public keys of the keys folder; each accepted
connection carries the client's key as its ZAP User-Id, which the trainer binds to the
generator's session at the handshake (see ``roster.py``). ``ipc://`` endpoints rely on the
private directory (mode 0700) they live in (see ``ipcdir.py``); CURVE works there too.
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.errors import InsecureEndpointError
from rlhf_engine.transport.keys import CurveKeys, allowed_client_keys, apply_client_keys, apply_server_keys, load_keys
from rlhf_engine.transport.wire import WireLimits

log = logging.getLogger(__name__)

CHANNELS = ("control", "rollouts", "prompts")
FRAME_OVERHEAD = 256
"""Slack on MAXMSGSIZE: ZeroMQ checks it against the frame on the wire, which CURVE makes a
few dozen bytes longer than the payload (command name, nonce, MAC)."""


def channel_endpoint(base: str, channel: str) -> str:
    """The endpoint of ``channel`` derived from the base endpoint (see ``TransportConfig.endpoint``)."""
    index = CHANNELS.index(channel)
    if base.startswith("ipc://"):
        return f"{base}.{channel}"
    if base.startswith("tcp://"):
        host, sep, port = base[len("tcp://"):].rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"tcp endpoint needs an explicit port, got {base!r}")
        return f"tcp://{host}:{int(port) + index}"
    raise ValueError(f"endpoint must start with ipc:// or tcp://, got {base!r}")


class _AllowList:
    """ZAP credentials provider: a client may connect iff its public key is in the keys folder."""

    def __init__(self, keys: set[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


def check_security(config: TransportConfig, *, server: bool) -> None:
    """The endpoint's security settings as they would be applied, checked without a socket: the CURVE keys
    load (`FileNotFoundError`/`ValueError` naming the folder), and a tcp endpoint without them is allowed
    only with ``allow_insecure`` (`InsecureEndpointError`)."""
    if config.curve_keys_dir is not None:
        load_keys(config.curve_keys_dir, server=server, client_key=config.curve_client_key)
        if server:
            allowed_client_keys(config.curve_keys_dir)
    elif config.endpoint is not None and config.endpoint.startswith("tcp://") and not config.allow_insecure:
        raise InsecureEndpointError(
            f"transport.endpoint {config.endpoint!r} is tcp without CURVE keys: set transport.curve_keys_dir "
            "(create keys with `rlhf-engine keys DIR`) or transport.allow_insecure: true"
        )


class Security:
    """CURVE setup for one end, checked against the endpoint; ``close()`` stops the authenticator."""

    def __init__(self, config: TransportConfig, *, server: bool, context: zmq.Context) -> None:
        self.keys: CurveKeys | None = None
        self._server = server
        self._auth: ThreadAuthenticator | None = None
        check_security(config, server=server)
        if config.curve_keys_dir is not None:
            self.keys = load_keys(config.curve_keys_dir, server=server, client_key=config.curve_client_key)
            if server:
                allowed = allowed_client_keys(config.curve_keys_dir)
                self._auth = ThreadAuthenticator(context, log=logging.getLogger("rlhf_engine.transport.zap"))
                self._auth.start()
                self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(allowed))
                log.info("CURVE on %s: %d client keys allowed", config.endpoint, len(allowed))
        elif config.endpoint is not None and config.endpoint.startswith("tcp://"):
            log.warning("transport endpoint %s runs WITHOUT encryption or authentication (allow_insecure=True): "
                        "anyone who reaches it can join as a generator", config.endpoint)

    @property
    def curve(self) -> bool:
        return self.keys is not None

    def apply(self, sock: zmq.Socket) -> None:
        if self.keys is None:
            return
        if self._server:
            apply_server_keys(sock, self.keys)
        else:
            apply_client_keys(sock, self.keys)

    def close(self) -> bool:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        return True


def open_socket(context: zmq.Context, kind: int, endpoint: str, *, bind: bool, security: Security,
                config: TransportConfig, limits: WireLimits, hwm: int | None = None) -> zmq.Socket:
    """A socket with linger, the channel's frame size limit (MAXMSGSIZE: no larger frame is ever
    allocated), high-water marks and CURVE applied, then bound or connected."""
    sock = context.socket(kind)
    try:
        sock.linger = config.linger_ms
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes + FRAME_OVERHEAD)
        if hwm is not None:
            sock.sndhwm = hwm
            sock.rcvhwm = hwm
        security.apply(sock)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise OSError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from e
    return sock
