"""Where the two ends meet and who may: endpoint names per channel, CURVE keys, the ZAP allow-list, the
trainer's private ipc directory, and socket setup.

Only our peers talk to us: every ``tcp://`` endpoint, loopback included, needs CURVE keys
(``transport.curve_keys_dir``) unless ``allow_insecure`` is set. With keys, the trainer runs a
ZAP handler that accepts only the client public keys of the keys folder; each accepted
connection carries the client's key as its ZAP User-Id, which the trainer binds to the
generator's session at the handshake (see ``roster.py``). ``ipc://`` endpoints rely on the
private directory (mode 0700) they live in (``IpcEndpoint``); CURVE works there too.

Keys (``rlhf-engine keys DIR`` writes them): a keys folder holds certificates in ZeroMQ's text format
(``zmq.auth``): ``server.key`` / ``server.key_secret`` (the trainer) and ``client.key`` /
``client.key_secret`` (the generators' shared key), plus optional per-generator keys
``clients/NAME.key`` / ``clients/NAME.key_secret`` (``add_client_key``). The trainer
encrypts with its secret key and accepts only clients whose public key is in the folder
(``allowed_client_keys``); a generator needs the server's public key and its own secret
key (``transport.curve_client_key``, default ``client.key_secret``). Secret files are mode 0600.
With one shared client key, every generator holding it can claim any generator's name;
per-generator keys bind each name to its own key.

The ipc directory: without a configured endpoint the trainer makes a fresh directory (mode 0700, so only
this user's processes can reach the sockets in it) and binds ``ipc://DIR/engine``; it removes the
directory when it closes. Binding an ``ipc://`` endpoint takes an exclusive ``flock`` on
``PATH.lock`` (holding the owner's pid) next to the sockets: while the owner lives (the kernel
drops the lock when it dies, also on SIGKILL) a second trainer is refused with
``EndpointInUseError`` instead of silently unlinking and re-binding the sockets.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rlhf_engine.transport.config import CHANNELS, IPC_DIR_PREFIX, SOCKET_NAME, TransportConfig
from rlhf_engine.transport.errors import EndpointInUseError, InsecureEndpointError
from rlhf_engine.transport.wire import WireLimits

log = logging.getLogger(__name__)

SERVER = "server"
CLIENT = "client"
CLIENTS_DIR = "clients"


@dataclass(frozen=True)
class CurveKeys:
    """Keys one end needs: the server's secret only when loaded for the server (then no client
    key: the trainer's allow-list comes from ``allowed_client_keys``), the client's pair otherwise."""

    directory: Path
    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes | None


def generate_keys(directory: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write a server and a client keypair into ``directory``; returns the files written."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (built without libsodium)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    names = [folder / f"{who}.{ext}" for who in (SERVER, CLIENT) for ext in ("key", "key_secret")]
    existing = [str(p) for p in names if p.exists()]
    if existing and not force:
        raise FileExistsError(f"key files already exist: {existing}; pass force=True (--force) to overwrite")
    written = []
    for who in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(str(folder), who)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


def add_client_key(directory: str | os.PathLike, name: str, *, force: bool = False) -> list[Path]:
    """Write a keypair for generator ``name`` into ``directory/clients`` (its public key joins the
    trainer's allow-list; the generator uses ``curve_client_key=<written secret file>``)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"client key name must be letters, digits, '-', '_' or '.', got {name!r}")
    folder = Path(directory) / CLIENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    existing = [str(p) for p in (folder / f"{name}.key", folder / f"{name}.key_secret") if p.exists()]
    if existing and not force:
        raise FileExistsError(f"key files already exist: {existing}; pass force=True (--force) to overwrite")
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


def allowed_client_keys(directory: str | os.PathLike) -> set[bytes]:
    """z85 public keys the trainer accepts: ``client.key`` and ``clients/*.key`` of ``directory``."""
    folder = Path(directory)
    paths = [folder / f"{CLIENT}.key", *sorted((folder / CLIENTS_DIR).glob("*.key"))]
    keys = set()
    for path in paths:
        if path.exists():
            public, _ = zmq.auth.load_certificate(str(path))
            keys.add(public)
    if not keys:
        raise FileNotFoundError(f"CURVE keys folder {folder} holds no client public key; "
                                f"create it with `rlhf-engine keys {folder}`")
    return keys


def load_keys(directory: str | os.PathLike, *, server: bool, client_key: str | os.PathLike | None = None) -> CurveKeys:
    """Load the keys the server (trainer) or a client (generator) needs from ``directory``;
    a client uses ``client_key`` (a secret key file) instead of ``client.key_secret`` when given."""
    folder = Path(directory)
    client_path = Path(client_key) if client_key is not None else folder / f"{CLIENT}.key_secret"
    try:
        server_public, server_secret = zmq.auth.load_certificate(str(folder / f"{SERVER}.key_secret" if server else folder / f"{SERVER}.key"))
        if server:
            client_public, client_secret = b"", None
        else:
            client_public, client_secret = zmq.auth.load_certificate(str(client_path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CURVE keys folder {folder} is incomplete ({e}); create it with `rlhf-engine keys {folder}`") from None
    if server and server_secret is None:
        raise ValueError(f"{folder / (SERVER + '.key_secret')} holds no secret key")
    if not server and client_secret is None:
        raise ValueError(f"{client_path} holds no secret key")
    return CurveKeys(folder, server_public, server_secret if server else None, client_public, client_secret)


def apply_server_keys(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_server = True
    sock.curve_publickey = keys.server_public
    sock.curve_secretkey = keys.server_secret


def apply_client_keys(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


def keys_main(argv: list[str] | None = None) -> int:
    """``rlhf-engine keys DIR [--client NAME] [--force]``: write a CURVE keys folder, or add a
    generator's own keypair to it."""
    parser = argparse.ArgumentParser(prog="rlhf-engine keys", description="Write CURVE keypairs for tcp transport endpoints.")
    parser.add_argument("directory", help="folder to write server.key, server.key_secret, client.key, client.key_secret")
    parser.add_argument("--client", metavar="NAME", help="add a keypair for one generator: clients/NAME.key(_secret)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = parser.parse_args(argv)
    if args.client is not None:
        written = add_client_key(args.directory, args.client, force=args.force)
        for path in written:
            print(path)
        print(f"restart the trainer to allow the new key; that generator: set transport.curve_keys_dir="
              f"{args.directory} and transport.curve_client_key={written[1]}")
        return 0
    for path in generate_keys(args.directory, force=args.force):
        print(path)
    print(f"trainer and generators: set transport.curve_keys_dir={args.directory} (copy the folder to every host)")
    return 0


class IpcEndpoint:
    """Owns the trainer's base endpoint: ``endpoint`` is what generators connect to."""

    def __init__(self, endpoint: str | None, ipc_dir: str | None = None) -> None:
        self._dir: str | None = None
        self._lock_fd: int | None = None
        if endpoint is None:
            self._dir = tempfile.mkdtemp(prefix=IPC_DIR_PREFIX, dir=ipc_dir)  # mode 0700
            endpoint = f"ipc://{self._dir}/{SOCKET_NAME}"
        self.endpoint = endpoint
        if endpoint.startswith("ipc://"):
            try:
                self._lock(endpoint[len("ipc://"):] + ".lock")
            except BaseException:
                self.close()
                raise

    def _lock(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EndpointInUseError(
                f"endpoint {self.endpoint} is held by a live run (pid {owner}, lock {path}): stop that run "
                f"or set another transport.endpoint (leave it unset for a private one)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_path, self._lock_fd = path, fd

    def close(self) -> bool:
        """Release the lock and remove what this object made (idempotent)."""
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return True


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
