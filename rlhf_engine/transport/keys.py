"""CURVE keypairs for tcp endpoints: ``rlhf-engine keys DIR`` writes them.

A keys folder holds certificates in ZeroMQ's text format (``zmq.auth``):
``server.key`` / ``server.key_secret`` (the trainer) and ``client.key`` /
``client.key_secret`` (the generators' shared key), plus optional per-generator keys
``clients/NAME.key`` / ``clients/NAME.key_secret`` (``add_client_key``). The trainer
encrypts with its secret key and accepts only clients whose public key is in the folder
(``allowed_client_keys``); a generator needs the server's public key and its own secret
key (``transport.curve_client_key``, default ``client.key_secret``). Secret files are mode 0600.
With one shared client key, every generator holding it can claim any generator's name;
per-generator keys bind each name to its own key.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

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
