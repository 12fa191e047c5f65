"""Peers for the relay tests: a generator process (spawned) and a hand-made lying relay leader."""

from __future__ import annotations

import os
import socket
import threading
import time

import zmq

from rlhf_engine.transport import GeneratorPort, ShutdownRequested, TransportConfig
from rlhf_engine.transport.endpoints import channel_endpoint
from rlhf_engine.transport.shm import owned_prefix
from rlhf_engine.transport.wire import (
    HeartbeatHeader,
    HelloHeader,
    WeightsHeader,
    WeightsRelayedHeader,
    WireLimits,
    decode,
    encode,
)

FINGERPRINT = "f" * 64


def taking_generator_main(config: TransportConfig, name: str, ready_path: str) -> None:
    """Join, then take and ack every weight update until told to shut down (or killed)."""
    with GeneratorPort(config, FINGERPRINT, name=name) as port:
        open(ready_path, "w").close()
        try:
            while True:
                update = port.wait_weights(port.current_version + 1, timeout_s=None)
                update.ack()
        except ShutdownRequested:
            pass


class LyingPeer:
    """A raw DEALER that handshakes as a generator that can use shared memory, heartbeats, and answers the
    last bucket of every weights message marked ``relay`` (of any weights message when ``always``) with a
    ``WeightsRelayedHeader`` of the fields ``lie(version)``. It never acks."""

    def __init__(self, endpoint: str, lie, always: bool = False, name: str = "liar") -> None:
        self.lie = lie
        self.always = always
        self.name = name
        self.relay_requests: list[int] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(channel_endpoint(endpoint, "control"))
        self._seq = 0
        self._send(HelloHeader, fingerprint=FINGERPRINT, hostname=socket.gethostname(), shm=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _send(self, cls, **fields) -> None:
        self._seq += 1
        self._sock.send_multipart(encode(cls(sender=self.name, seq=self._seq, **fields)))

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            if time.monotonic() > next_beat:
                self._send(HeartbeatHeader)
                next_beat = time.monotonic() + 0.1
            if not self._sock.poll(20):
                continue
            header, _ = decode(self._sock.recv_multipart(), WireLimits())
            if not isinstance(header, WeightsHeader) or header.bucket != header.num_buckets - 1:
                continue
            if header.relay:
                self.relay_requests.append(header.weight_version)
            if header.relay or self.always:
                self._send(WeightsRelayedHeader, **self.lie(header.weight_version))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()


def fake_file(directory: str, size: int) -> str:
    """A file named like ours (so that only the checks under test can refuse it), of ``size`` bytes."""
    path = os.path.join(directory, f"{owned_prefix('relay')}liar{size}")
    with open(path, "wb") as f:
        f.truncate(size)
    return path
