"""Peers that break the protocol on an endpoint they can reach: a hello and then silence, a generator that never
acks weights, a hello with a live generator's name, a pull socket that steals a prompt batch, rollouts without a
session. Each is dropped, refused or outlived, and the port and the other generators go on (keys keep peers out
of a tcp endpoint: test_security.py)."""

import os
import socket
import threading
import time

import torch
import zmq

from rlhf_engine.transport import GeneratorPort, PromptBatch, TrainerPort
from rlhf_engine.transport.messages import sample_to_wire
from rlhf_engine.transport.wire import (
    HeartbeatHeader,
    HelloHeader,
    ShutdownHeader,
    WelcomeHeader,
    WireLimits,
    decode,
    encode,
)
from tests.helpers.peers import FINGERPRINT, fast_config, handshake_event, ipc_endpoint, make_rollout, raw_peer
from tests.helpers.waiting import wait_until


def test_rogue_hello_then_silence_is_a_lost_generator_not_an_error():
    config = fast_config(ipc_endpoint(), heartbeat_timeout_s=1.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.DEALER, "control") as rogue:
            rogue.send_multipart(encode(HelloHeader(sender="rogue", seq=0, fingerprint=FINGERPRINT,
                                                    hostname="elsewhere", shm=False)))
            (info,) = trainer.wait_for_generators(1, timeout_s=5)
            assert info.name == "rogue"
            lost = wait_until(trainer.pop_lost_generators, 5, message="the silent rogue lost")
            assert [(g.name, g.state) for g in lost] == [("rogue", "lost")]
            trainer.raise_if_dead()  # the port itself is fine
            assert trainer.generators() == []
            got = []

            def shutdowns() -> list[str]:
                while rogue.poll(0):
                    got.append(decode(rogue.recv_multipart(), WireLimits())[0])
                return [h.reason for h in got if isinstance(h, ShutdownHeader)]

            wait_until(shutdowns, 5, message="a shutdown sent to the rogue")
            assert isinstance(got[0], WelcomeHeader) and isinstance(got[-1], ShutdownHeader)
            rogue.send_multipart(encode(HeartbeatHeader(sender="rogue", seq=5)))  # too late: no session
            wait_until(lambda: trainer.drop_counts() == {"unknown_peer": 1}, 5, message="its heartbeat dropped")
            # the answer to it says why it was dropped again (it may come before the first shutdown is read)
            wait_until(lambda: len(shutdowns()) == 2, 5, message="a second shutdown")
            assert shutdowns() == ["dropped from the roster: silent for more than 1.0 s"] * 2


class DeafRogue:
    """A peer on its own thread that handshakes as a same-host generator, heartbeats, and drops every
    weight update without an ack (so it holds each shared-memory buffer); records what it received."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.received: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with raw_peer(self.endpoint, zmq.DEALER, "control") as sock:
            sock.send_multipart(encode(HelloHeader(sender="deaf", seq=0, fingerprint=FINGERPRINT,
                                                   hostname=socket.gethostname(), shm=True)))
            seq = 1
            while not self._stop.is_set():
                while sock.poll(0):
                    header, _ = decode(sock.recv_multipart(), WireLimits())
                    self.received.append(header)
                sock.send_multipart(encode(HeartbeatHeader(sender="deaf", seq=seq)))
                seq += 1
                time.sleep(0.1)

    def kinds(self) -> list[tuple]:
        return [(type(h).__name__, getattr(h, "weight_version", None)) for h in self.received
                if not isinstance(h, HeartbeatHeader)]


def test_a_generator_that_never_acks_weights_is_dropped_and_the_others_go_on(tmp_path):
    config = fast_config(ipc_endpoint(), shm_dir=str(tmp_path), ack_timeout_s=1.0)
    w = torch.arange(64.0)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen, \
            DeafRogue(config.endpoint) as rogue:
        assert {g.name for g in trainer.wait_for_generators(2)} == {gen.sender_id, "deaf"}
        for v in (1, 2, 3, 4):
            t0 = time.monotonic()
            sent_to = trainer.publish_weights(v, {"w": w + v})
            took = time.monotonic() - t0
            update = gen.wait_weights(v, timeout_s=10)
            assert torch.equal(update.tensors["w"], w + v)
            update.ack()
            if v == 3:  # both buffers held by the rogue: waited ack_timeout_s, then dropped it
                assert took >= 1.0 and sorted(sent_to) == [gen.sender_id]
                assert [(g.name, g.state) for g in trainer.pop_lost_generators()] == [("deaf", "unacked")]
                print(f"\nunacked generator dropped after {took:.2f} s (ack_timeout_s=1.0)")
            assert trainer.wait_for_acks(v, timeout_s=10, generators=[gen.sender_id]) == {gen.sender_id: True}
        assert [g.name for g in trainer.generators()] == [gen.sender_id]
        assert len(os.listdir(tmp_path)) == 2  # its buffers were reused, none added
        wait_until(lambda: ("ShutdownHeader", None) in rogue.kinds(), 5, message="a shutdown sent to the rogue")
        kinds = rogue.kinds()  # the shutdown came after whatever it was sent before, on the same connection
        assert kinds[:3] == [("WelcomeHeader", None), ("WeightsHeader", 1), ("WeightsHeader", 2)]
        assert ("WeightsHeader", 3) not in kinds
        wait_until(lambda: trainer.drop_counts().get("unknown_peer", 0) > 0, 5, message="its later heartbeats dropped")
    assert os.listdir(tmp_path) == []


def test_a_hello_with_the_name_of_a_live_generator_is_refused():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        trainer.wait_for_generators(1)
        with raw_peer(config.endpoint, zmq.DEALER, "control") as rogue:
            rogue.send_multipart(encode(HelloHeader(sender=gen.sender_id, seq=0, fingerprint=FINGERPRINT,
                                                    hostname="elsewhere", shm=False)))
            assert rogue.poll(5000)
            header, _ = decode(rogue.recv_multipart(), WireLimits())
            assert header.reason == f"generator name {gen.sender_id!r} is already connected"
            assert [g.name for g in trainer.generators()] == [gen.sender_id]


def test_a_rogue_pull_that_steals_a_batch_does_not_hang_the_port_and_a_reissue_reaches_a_generator():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.PULL, "prompts") as thief:
            assert handshake_event(thief) == zmq.EVENT_HANDSHAKE_SUCCEEDED  # the only peer the batch can go to
            trainer.send_prompts(PromptBatch(0, [10, 11, 12], [[1], [2], [3]]), timeout_s=5)
            assert thief.poll(5000)  # the batch went to the thief
            header, _ = decode(thief.recv_multipart(), WireLimits())
            assert header.prompt_ids == (10, 11, 12)
        with GeneratorPort(config, FINGERPRINT) as gen:
            trainer.wait_for_generators(1)
            trainer.send_prompts(PromptBatch(0, [11, 12], [[2], [3]]), timeout_s=5)  # re-issue of a subset
            batch = gen.recv_prompts(timeout_s=5)
            assert (batch.batch_id, batch.prompt_ids, batch.prompts) == (0, [11, 12], [[2], [3]])


def test_rollouts_from_a_sender_without_a_session_are_dropped_and_counted():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.PUSH, "rollouts") as raw:
            for i in range(3):
                raw.send_multipart(encode(*sample_to_wire(make_rollout(0, i, 4, 4), "never-said-hello", i)))
            wait_until(lambda: trainer.drop_counts() == {"unknown_sender": 3}, 5, message="3 rollouts dropped")
            assert trainer.recv_rollout(timeout_s=0) is None  # each was dropped, none queued


def test_removal_reasons_are_kept_for_the_latest_connections_only():
    from rlhf_engine.transport.roster import LOST, MAX_REASONS, Roster

    roster = Roster()
    for i in range(MAX_REASONS + 6):  # a peer that keeps reconnecting and being dropped
        identity = f"c{i}".encode()
        assert roster.join(identity, f"g{i}", "host", False, None) == ""
        roster.remove(identity, LOST, f"reason {i}")
    assert roster.removal_reason(b"c5") == ""  # the oldest are forgotten
    assert roster.removal_reason(f"c{MAX_REASONS + 5}".encode()) == f"reason {MAX_REASONS + 5}"
    assert sum(bool(roster.removal_reason(f"c{i}".encode())) for i in range(MAX_REASONS + 6)) == MAX_REASONS
    latest = f"c{MAX_REASONS + 5}".encode()
    assert roster.join(latest, "again", "host", False, None) == ""  # joined again: no removal to tell
    assert roster.removal_reason(latest) == ""
