"""CURVE keypairs for non-loopback endpoints: ``rlhf-engine keys DIR`` writes them.

A keys folder holds two certificates in ZeroMQ's text format (``zmq.auth``):
``server.key`` / ``server.key_secret`` (the trainer) and ``client.key`` /
``client.key_secret`` (the generators). The trainer encrypts with its secret key and
accepts only clients whose public key is in the folder; a generator needs the folder
too (its own secret key and the server's public key). Secret files are mode 0600.
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


@dataclass(frozen=True)
class CurveKeys:
    """Keys one end needs; ``server_secret`` is set only when loaded for the server."""

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


def load_keys(directory: str | os.PathLike, *, server: bool) -> CurveKeys:
    """Load the keys the server (trainer) or a client (generator) needs from ``directory``."""
    folder = Path(directory)
    try:
        server_public, server_secret = zmq.auth.load_certificate(str(folder / f"{SERVER}.key_secret" if server else folder / f"{SERVER}.key"))
        client_public, client_secret = zmq.auth.load_certificate(str(folder / f"{CLIENT}.key" if server else folder / f"{CLIENT}.key_secret"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CURVE keys folder {folder} is incomplete ({e}); create it with `rlhf-engine keys {folder}`") from None
    if server and server_secret is None:
        raise ValueError(f"{folder / (SERVER + '.key_secret')} holds no secret key")
    if not server and client_secret is None:
        raise ValueError(f"{folder / (CLIENT + '.key_secret')} holds no secret key")
    return CurveKeys(folder, server_public, server_secret if server else None, client_public, client_secret if not server else None)


def apply_server_keys(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_server = True
    sock.curve_publickey = keys.server_public
    sock.curve_secretkey = keys.server_secret


def apply_client_keys(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


def keys_main(argv: list[str] | None = None) -> int:
    """``rlhf-engine keys DIR [--force]``: write a CURVE keypair folder."""
    parser = argparse.ArgumentParser(prog="rlhf-engine keys", description="Write CURVE keypairs for non-loopback transport endpoints.")
    parser.add_argument("directory", help="folder to write server.key, server.key_secret, client.key, client.key_secret")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = parser.parse_args(argv)
    for path in generate_keys(args.directory, force=args.force):
        print(path)
    print(f"trainer and generators: set transport.curve_keys_dir={args.directory} (copy the folder to every host)")
    return 0
