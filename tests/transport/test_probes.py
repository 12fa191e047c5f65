"""The hostile-but-fair probes of issue 14, as tests: rogue peers, endpoint takeover, stale files,
oversized rollouts and a flood of the largest allowed ones."""

import contextlib
import multiprocessing as mp
import os
import socket
import stat
import threading
import time

import pytest
import torch
import zmq

from tests.helpers.peers import (
    FINGERPRINT,
    fast_config,
    flood_main,
    hold_endpoint_main,
    ipc_endpoint,
    make_rollout,
    rss_bytes,
    tcp_endpoint,
)
from rlhf_engine.rollout.staging import StagingFile
from rlhf_engine.transport import (
    EndpointInUseError,
    GeneratorPort,
    PromptBatch,
    TrainerPort,
    generate_keys,
    rollout_memory_bound,
)
from rlhf_engine.transport.endpoints import channel_endpoint
from rlhf_engine.transport.limits import rollout_limits
from rlhf_engine.transport.wire import HeartbeatHeader, HelloHeader, ShutdownHeader, WelcomeHeader, WireLimits, decode, encode


@contextlib.contextmanager
def raw_peer(endpoint: str, kind: int, channel: str):
    """A bare ZeroMQ socket of `kind` connected to `channel` of the trainer at `endpoint` (no handshake)."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.linger = 0
    try:
        sock.connect(channel_endpoint(endpoint, channel))
        yield sock
    finally:
        sock.close()
        ctx.term()


def _wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def _spawn(target, *args) -> mp.Process:
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def _dead_pid() -> int:
    proc = _spawn(time.sleep, 0)
    proc.join()
    return proc.pid


# ---- rogue peers -------------------------------------------------------------------------------

def test_rogue_hello_then_silence_is_a_lost_generator_not_an_error():
    config = fast_config(ipc_endpoint(), heartbeat_timeout_s=1.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.DEALER, "control") as rogue:
            rogue.send_multipart(encode(HelloHeader(sender="rogue", seq=0, fingerprint=FINGERPRINT,
                                                    hostname="elsewhere", shm=False)))
            (info,) = trainer.wait_for_generators(1, timeout_s=5)
            assert info.name == "rogue"
            lost = _wait_for(trainer.pop_lost_generators, 5)
            assert [(g.name, g.state) for g in lost] == [("rogue", "lost")]
            trainer.raise_if_dead()  # the port itself is fine
            assert trainer.generators() == []
            kinds = []
            while rogue.poll(200):
                header, _ = decode(rogue.recv_multipart(), WireLimits())
                kinds.append(type(header))
            assert kinds[0] is WelcomeHeader and kinds[-1] is ShutdownHeader  # told it was dropped
            rogue.send_multipart(encode(HeartbeatHeader(sender="rogue", seq=5)))  # too late: no session
            assert _wait_for(lambda: trainer.drop_counts().get("unknown_peer") == 1, 5)


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
        assert _wait_for(lambda: ("ShutdownHeader", None) in rogue.kinds(), 5)
        kinds = rogue.kinds()
        assert kinds[:3] == [("WelcomeHeader", None), ("WeightsHeader", 1), ("WeightsHeader", 2)]
        assert ("WeightsHeader", 3) not in kinds
        assert _wait_for(lambda: trainer.drop_counts().get("unknown_peer", 0) > 0, 5)  # its later heartbeats
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
            time.sleep(0.2)  # connected
            start = time.monotonic()
            trainer.send_prompts(PromptBatch(0, [10, 11, 12], [[1], [2], [3]]), timeout_s=5)
            assert time.monotonic() - start < 5
            assert thief.poll(5000)  # the batch went to the thief
            header, _ = decode(thief.recv_multipart(), WireLimits())
            assert header.prompt_ids == (10, 11, 12)
        with GeneratorPort(config, FINGERPRINT) as gen:
            trainer.wait_for_generators(1)
            trainer.send_prompts(PromptBatch(0, [11, 12], [[2], [3]]), timeout_s=5)  # re-issue of a subset
            batch = gen.recv_prompts(timeout_s=5)
            assert (batch.batch_id, batch.prompt_ids, batch.prompts) == (0, [11, 12], [[2], [3]])


def test_with_curve_a_rogue_pull_without_keys_gets_no_batch(tmp_path):
    generate_keys(tmp_path / "keys")
    config = fast_config(tcp_endpoint(), curve_keys_dir=str(tmp_path / "keys"))
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.PULL, "prompts") as thief:
            with GeneratorPort(config, FINGERPRINT) as gen:
                trainer.wait_for_generators(1)
                for b in range(3):
                    trainer.send_prompts(PromptBatch(b, [b], [[b]]), timeout_s=5)
                    assert gen.recv_prompts(timeout_s=5).batch_id == b
            assert not thief.poll(300)


def test_rollouts_from_a_sender_without_a_session_are_dropped_and_counted():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.PUSH, "rollouts") as raw:
            for i in range(3):
                raw.send_multipart(encode(*make_rollout(0, i, 4, 4).to_wire("never-said-hello", i)))
            assert _wait_for(lambda: trainer.drop_counts() == {"unknown_sender": 3}, 5)
            assert trainer.recv_rollout(timeout_s=0) is None


# ---- endpoints and files -----------------------------------------------------------------------

def test_the_default_endpoint_is_a_fresh_private_directory_removed_on_close(tmp_path):
    config = fast_config(ipc_endpoint())
    config.endpoint = None
    config.ipc_dir = str(tmp_path)
    with TrainerPort(config, FINGERPRINT) as a, TrainerPort(config, FINGERPRINT) as b:
        assert a.endpoint != b.endpoint
        folder = os.path.dirname(a.endpoint[len("ipc://"):])
        assert os.path.dirname(folder) == str(tmp_path)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        with GeneratorPort(fast_config(a.endpoint), FINGERPRINT):
            assert len(a.wait_for_generators(1)) == 1
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="needs the trainer's endpoint"):
        GeneratorPort(config, FINGERPRINT)


def test_a_second_run_on_the_endpoint_of_a_live_run_is_refused_and_a_dead_runs_is_taken(tmp_path):
    config = fast_config(f"ipc://{tmp_path}/ep")
    ready = tmp_path / "ready"
    owner = _spawn(hold_endpoint_main, config, str(ready))
    try:
        assert _wait_for(lambda: ready.exists() and ready.read_text(), 60)
        with pytest.raises(EndpointInUseError, match=f"held by a live run \\(pid {owner.pid}"):
            TrainerPort(config, FINGERPRINT)
        with GeneratorPort(config, FINGERPRINT):  # the live run still serves its generators
            pass
        owner.kill()
        owner.join()
        with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT):
            assert len(trainer.wait_for_generators(1)) == 1
    finally:
        owner.kill()
        owner.join()


def test_starting_removes_stale_files_of_dead_runs_never_of_live_ones(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    ns = os.stat("/proc/self/ns/pid").st_ino  # names carry the owner's pid namespace
    stale = [tmp_path / f"rlhf-engine-{dead}.{ns}-weights-ab", tmp_path / f"rlhf-engine-{dead}.{ns}-staging-cd"]
    kept = [tmp_path / f"rlhf-engine-{live}.{ns}-staging-ef", tmp_path / "unrelated",
            tmp_path / f"rlhf-engine-{dead}.{ns + 1}-relay-ij",  # another pid namespace: its pids mean nothing here
            tmp_path / f"rlhf-engine-{dead}-weights-kl"]  # no namespace in the name: not swept either
    for path in stale + kept:
        path.write_bytes(b"x")
    adapters = tmp_path / f"rlhf-engine-{dead}.{ns}-adapters-gh"  # a killed vLLM generator's adapter folder
    (adapters / "policy-v3").mkdir(parents=True)
    (adapters / "policy-v3" / "adapter_model.safetensors").write_bytes(b"x")
    with TrainerPort(fast_config(ipc_endpoint(), shm_dir=str(tmp_path)), FINGERPRINT):
        assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept)


def test_a_staging_file_is_named_for_its_owner_and_removed_when_it_closes(tmp_path):
    staging = StagingFile({"w": (4, 4)}, torch.float32, directory=str(tmp_path))
    (name,) = os.listdir(tmp_path)
    assert name.startswith(f"rlhf-engine-{os.getpid()}.{os.stat('/proc/self/ns/pid').st_ino}-staging-")
    assert stat.S_IMODE(os.stat(staging.path).st_mode) == 0o600
    staging.close()
    assert os.listdir(tmp_path) == []


# ---- size limits and the memory bound -----------------------------------------------------------

def test_a_rollout_over_the_configured_lengths_is_dropped_and_counted():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=16, max_response_tokens=32)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        gen.send_rollout(make_rollout(0, 0, 16, 33))  # one response token too many
        gen.send_rollout(make_rollout(0, 1, 17, 8))  # one prompt token too many
        gen.send_rollout(make_rollout(0, 2, 16, 32))  # the largest allowed
        assert trainer.recv_rollout(timeout_s=5).rollout_id == "g0-2"
        assert trainer.drop_counts() == {"message_too_large": 1, "rollout_too_large": 1}


def test_a_96_mib_rollout_never_reaches_the_trainers_memory():
    """The issue's probe: 24 well-formed 96 MiB rollouts grew the trainer 0.49 -> 2.85 GB. With
    config-derived limits such a frame is over the socket's MAXMSGSIZE: ZeroMQ cuts the sender's
    connection before allocating it; the generator reconnects and its next rollout arrives."""
    config = fast_config(ipc_endpoint(), max_prompt_tokens=1024, max_response_tokens=1024, rollout_queue_size=4)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        trainer.wait_for_generators(1)
        before = rss_bytes()
        huge = make_rollout(0, 0, 16, 12 << 20)  # 96 MiB of response tokens
        for i in range(4):
            huge.rollout_id = f"huge-{i}"
            gen.send_rollout(huge, timeout_s=30)
        gen.send_rollout(make_rollout(0, 1, 16, 16), timeout_s=30)
        del huge
        got = trainer.recv_rollout(timeout_s=30)
        assert got is not None and got.rollout_id == "g0-1"
        assert trainer.recv_rollout(timeout_s=0.5) is None
    assert rss_bytes() - before < 96 << 20


def test_a_flood_of_the_largest_allowed_rollouts_stays_within_the_stated_bound():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=32768, max_response_tokens=32768, rollout_hwm=16,
                         rollout_queue_bytes=16 << 20, heartbeat_timeout_s=30)
    bound = rollout_memory_bound(config, generators=1)
    message = rollout_limits(config).max_message_bytes
    assert message == 8 * 65536 + 4 * 32768
    n = 300  # ~190 MiB offered, several times the bound
    assert n * message > 4 * bound
    with TrainerPort(config, FINGERPRINT) as trainer:
        before = rss_bytes()
        proc = _spawn(flood_main, config, n, 32768, 32768)
        try:
            trainer.wait_for_generators(1, timeout_s=60)
            peak, last_change, depth = 0, time.monotonic(), -1
            while time.monotonic() - last_change < 3 and time.monotonic() - before < 120:  # until the flood stalls
                peak = max(peak, rss_bytes() - before)
                if trainer.rollout_queue_depth != depth:
                    depth, last_change = trainer.rollout_queue_depth, time.monotonic()
                time.sleep(0.05)
            assert trainer.rollout_queue_bytes <= config.rollout_queue_bytes
            assert 0 < depth < n  # back-pressure stopped the flood
            print(f"flood: peak RSS growth {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, queued {depth}")
            assert peak <= bound
            received = 0
            while trainer.recv_rollout(timeout_s=10) is not None:  # and everything still arrives
                received += 1
                if received == n:
                    break
            assert received == n and trainer.drop_counts() == {}
        finally:
            proc.kill()
            proc.join()
