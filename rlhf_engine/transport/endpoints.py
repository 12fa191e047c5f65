"""Endpoint names per channel, the loopback rule, and socket security setup."""

from __future__ import annotations

import ipaddress
import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.errors import InsecureEndpointError
from rlhf_engine.transport.keys import CurveKeys, apply_client_keys, apply_server_keys, load_keys

log = logging.getLogger(__name__)

CHANNELS = ("control", "rollouts", "prompts")


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


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name, "*" or a DNS name: not known to be loopback


class Security:
    """CURVE setup for one end, checked against the endpoint; ``close()`` stops the authenticator."""

    def __init__(self, config: TransportConfig, *, server: bool, context: zmq.Context) -> None:
        self.keys: CurveKeys | None = None
        self._server = server
        self._auth: ThreadAuthenticator | None = None
        if config.curve_keys_dir is not None:
            self.keys = load_keys(config.curve_keys_dir, server=server)
            if server:
                self._auth = ThreadAuthenticator(context)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(self.keys.directory))
        elif not is_loopback(config.endpoint):
            if not config.allow_insecure:
                raise InsecureEndpointError(
                    f"endpoint {config.endpoint!r} is not loopback: set transport.curve_keys_dir "
                    "(create keys with `rlhf-engine keys DIR`) or pass allow_insecure=True"
                )
            log.warning("transport endpoint %s is not loopback and runs WITHOUT encryption or authentication "
                        "(allow_insecure=True)", config.endpoint)

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
                config: TransportConfig, hwm: int | None = None) -> zmq.Socket:
    """A socket with linger, size limit (MAXMSGSIZE: no frame larger than the wire limits is
    ever allocated), high-water marks and CURVE applied, then bound or connected."""
    sock = context.socket(kind)
    try:
        sock.linger = config.linger_ms
        sock.setsockopt(zmq.MAXMSGSIZE, max(config.limits.max_tensor_bytes, config.limits.max_header_bytes))
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
