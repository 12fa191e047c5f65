"""Helpers for the transport tests: endpoints, configs, and process entry points (spawned)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from rlhf_engine.transport import GeneratorPort, Sample, ShutdownRequested, TrainerPort, TransportConfig
from rlhf_engine.transport.endpoints import channel_endpoint

FINGERPRINT = "f" * 64


@functools.cache
def _short_root(pid: int) -> str:
    """This process's parent folder of `short_dir`s, removed when the process that made it exits."""
    root = tempfile.mkdtemp(prefix="rt-", dir="/tmp")

    def remove() -> None:
        if os.getpid() == pid:  # not in a forked child that inherited the hook
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(remove)
    return root


def short_dir() -> str:
    """A fresh folder with a short path, for ipc sockets (a socket path has at most 107 characters; a pytest-xdist
    worker's `tmp_path` can pass that with a run's socket names under it); removed with its parent folder when
    this process exits."""
    return tempfile.mkdtemp(dir=_short_root(os.getpid()))


def ipc_endpoint() -> str:
    return f"ipc://{short_dir()}/ep"


def tcp_endpoint() -> str:
    """A tcp://127.0.0.1:PORT whose PORT, PORT+1, PORT+2 are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            probes = []
            for port in (base, base + 1, base + 2):
                p = socket.socket()
                probes.append(p)
                p.bind(("127.0.0.1", port))
            return f"tcp://127.0.0.1:{base}"
        except OSError:
            continue
        finally:
            for p in probes:
                p.close()
    raise RuntimeError("no three consecutive free ports")


def fast_config(endpoint: str, **overrides) -> TransportConfig:
    """Quick heartbeats; a tcp endpoint without keys runs with ``allow_insecure`` (tests of the
    wire itself; tests/transport/test_security.py checks that tcp needs keys)."""
    fields = dict(endpoint=endpoint, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.5, handshake_timeout_s=10.0)
    if endpoint.startswith("tcp://") and "curve_keys_dir" not in overrides:
        fields["allow_insecure"] = True
    fields.update(overrides)
    return TransportConfig(**fields)


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@contextlib.contextmanager
def raw_peer(endpoint: str, kind: int, channel: str):
    """A bare ZeroMQ socket of `kind` connected to `channel` of the trainer at `endpoint` (no session
    handshake), its ZMTP handshakes monitored from before it connects (`handshake_event`)."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.linger = 0
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        sock.connect(channel_endpoint(endpoint, channel))
        yield sock
    finally:
        monitor.close(linger=0)
        sock.close()
        ctx.term()


def handshake_event(sock: zmq.Socket, timeout_s: float = 10.0) -> zmq.Event:
    """The next ZMTP handshake event of a `raw_peer` socket: `HANDSHAKE_SUCCEEDED` once the trainer's socket
    has taken it as a peer (a PUSH then hands it batches too), a `HANDSHAKE_FAILED_*` when it refused it."""
    monitor = sock.get_monitor_socket()  # the one `raw_peer` opened
    if not monitor.poll(timeout_s * 1000):
        raise AssertionError(f"no ZMTP handshake event within {timeout_s} s")
    return zmq.Event(recv_monitor_message(monitor)["event"])


def spawn(target, *args) -> mp.Process:
    """`target(*args)` started in a fresh (spawned) process."""
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def make_rollout(sender: int, i: int, prompt_len: int = 64, response_len: int = 128) -> Sample:
    g = torch.Generator().manual_seed(sender * 1_000_003 + i)
    return Sample(
        sample_id=f"g{sender}-{i}",
        prompt_id=i,
        prompt_ids=torch.randint(0, 32000, (prompt_len,), generator=g),
        response_ids=torch.randint(0, 32000, (response_len,), generator=g),
        behaviour_logp=-torch.rand(response_len, generator=g),
        policy_versions=sender,
        finish_reason="length",
        generation_time=0.5,
    )


def generator_main(config: TransportConfig, sender: int, n: int, duplicates: int) -> None:
    """Send n rollouts (plus ``duplicates`` re-sends of already-sent ids), then wait for shutdown."""
    with GeneratorPort(config, FINGERPRINT, name=f"g{sender}") as port:
        for i in range(n):
            port.send_rollout(make_rollout(sender, i, prompt_len=16, response_len=32))
            if i < duplicates:
                port.send_rollout(make_rollout(sender, i, prompt_len=16, response_len=32))
        port.flush(30)
        try:
            while True:
                port.recv_prompts(timeout_s=0.5)
        except ShutdownRequested:
            pass


def idle_generator_main(config: TransportConfig) -> None:
    """Connect and idle until killed (for dead-peer tests)."""
    port = GeneratorPort(config, FINGERPRINT, name="idle")
    while True:
        time.sleep(1)
        port.check()


def trainer_main(config: TransportConfig, ready_path: str) -> None:
    """Bind, accept generators and idle until killed."""
    with TrainerPort(config, FINGERPRINT):
        open(ready_path, "w").close()
        while True:
            time.sleep(1)


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def flood_main(config: TransportConfig, n: int, prompt_len: int, response_len: int) -> None:
    """Send ``n`` rollouts of the given size as fast as back-pressure allows, then idle until killed."""
    port = GeneratorPort(config, FINGERPRINT, name="flood")
    template = make_rollout(0, 0, prompt_len, response_len)
    for i in range(n):
        template.sample_id = f"flood-{i}"
        port.send_rollout(template, timeout_s=600)
    while True:
        time.sleep(1)


def hold_endpoint_main(config: TransportConfig, ready_path: str) -> None:
    """Bind a trainer port and write its pid when ready; idle until killed."""
    import os

    with TrainerPort(config, FINGERPRINT):
        with open(ready_path, "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(1)
