"""Weight updates: bit-exact transfer, atomic hand-over, stale/duplicate versions, buffer reuse."""

import dataclasses
import os
import threading
import time

import pytest
import torch
import zmq

from rlhf_engine.transport import GeneratorPort, ShutdownRequested, TrainerPort
from rlhf_engine.transport.endpoints import channel_endpoint
from rlhf_engine.transport.weights import model_fingerprint, state_dict_specs
from rlhf_engine.transport.wire import (
    HeartbeatHeader,
    WeightsAckHeader,
    WeightsHeader,
    WelcomeHeader,
    WireLimits,
    decode,
    encode,
    tensor_spec,
)
from tests.helpers.peers import FINGERPRINT, fast_config, ipc_endpoint, tcp_endpoint
from tests.helpers.waiting import wait_until


def mixed_state_dict(n_params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """About n_params parameters: 40% fp32, 40% bf16, 20% int64, in tensors of odd shapes."""
    g = torch.Generator().manual_seed(seed)
    sd, i, left = {}, 0, n_params
    while left > 0:
        n = min(left, 1_234_567)
        kind = i % 5
        if kind in (0, 1):
            sd[f"layer{i}.weight"] = torch.randn(n, generator=g).view(-1, 1) if n % 7 else torch.randn(n // 7, 7, generator=g)
        elif kind in (2, 3):
            sd[f"layer{i}.bias"] = torch.randn(n, generator=g).bfloat16()
        else:
            sd[f"layer{i}.index"] = torch.randint(-(2**62), 2**62, (n,), generator=g)
        left -= n
        i += 1
    return sd


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("make_endpoint, shm", [(ipc_endpoint, True), (tcp_endpoint, False)], ids=["ipc-shm", "tcp-frames"])
def test_50m_param_mixed_dtype_state_dict_round_trips_bit_exact(make_endpoint, shm):
    sd = mixed_state_dict(50_000_000)
    assert {t.dtype for t in sd.values()} == {torch.float32, torch.bfloat16, torch.int64}
    assert sum(t.numel() for t in sd.values()) == 50_000_000
    fp = model_fingerprint(state_dict_specs(sd))
    config = fast_config(make_endpoint(), bucket_bytes=32 << 20)
    with TrainerPort(config, fp) as trainer, GeneratorPort(config, fp) as gen:
        (info,) = trainer.wait_for_generators(1)
        assert info.shm is shm
        assert trainer.publish_weights(1, sd) == [gen.sender_id]
        update = gen.wait_weights(1, timeout_s=60)
        assert update.version == 1 and list(update.tensors) == list(sd)
        assert all(bit_equal(update.tensors[k], v) for k, v in sd.items())
        update.ack()
        assert trainer.wait_for_acks(1, timeout_s=10) == {gen.sender_id: True}


def test_shm_buffers_are_reused_and_bounded_and_a_generator_holding_both_is_dropped(tmp_path):
    sd = {"w": torch.randn(1000), "b": torch.randn(10).bfloat16()}
    config = fast_config(ipc_endpoint(), shm_dir=str(tmp_path), shm_buffers=2)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        trainer.wait_for_generators(1)
        for v in (1, 2):
            trainer.publish_weights(v, {k: t + v for k, t in sd.items()})
            update = gen.wait_weights(v, timeout_s=10)
            assert torch.equal(update.tensors["w"], sd["w"] + v)
            update.ack()
        trainer.wait_for_acks(2, timeout_s=10)
        trainer.publish_weights(3, {k: t * 3 for k, t in sd.items()})  # into the buffer of version 1
        held = [gen.wait_weights(3, timeout_s=10)]
        trainer.publish_weights(4, {k: t * 4 for k, t in sd.items()})  # into the buffer of version 2
        held.append(gen.wait_weights(4, timeout_s=10))
        assert torch.equal(held[0].tensors["w"], sd["w"] * 3) and torch.equal(held[1].tensors["b"], sd["b"] * 4)
        assert len(os.listdir(tmp_path)) == 2  # the two buffers, reused
        # taken, never acked: it holds both buffers; the next publish waits its timeout, then drops it
        assert trainer.publish_weights(5, sd, timeout_s=0.5) == []
        assert [(g.name, g.state) for g in trainer.pop_lost_generators()] == [(gen.sender_id, "unacked")]
        with pytest.raises(ShutdownRequested, match="no ack of a weight update for more than 0.5 s"):
            wait_until(gen.check, 5)
        assert len(os.listdir(tmp_path)) == 2
    assert os.listdir(tmp_path) == []  # removed on close


def test_a_generator_that_refuses_the_trainers_file_is_dropped_with_the_reason(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "generator").mkdir()
    endpoint = ipc_endpoint()
    trainer_cfg = fast_config(endpoint, shm_dir=str(tmp_path / "trainer"))
    gen_cfg = fast_config(endpoint, shm_dir=str(tmp_path / "generator"))  # misconfigured: not the trainer's folder
    with TrainerPort(trainer_cfg, FINGERPRINT) as trainer, GeneratorPort(gen_cfg, FINGERPRINT) as gen:
        trainer.wait_for_generators(1)
        trainer.publish_weights(1, {"w": torch.ones(8)})
        with pytest.raises(ShutdownRequested, match="refused the trainer's shared-memory file of weight version 1"):
            wait_until(gen.check, 10)
        assert [(g.name, g.state) for g in trainer.pop_lost_generators()] == [(gen.sender_id, "refused")]
        drops = trainer.drop_counts()
        # the refusal counted once; a heartbeat the generator sent before it heard it was dropped may arrive after
        # the drop, from a peer the trainer no longer knows
        assert drops.pop("refused_weights") == 1 and set(drops) <= {"unknown_peer"}, trainer.drop_counts()
        assert trainer.publish_weights(2, {"w": torch.ones(8)}, timeout_s=2) == []  # its hold was released


def test_a_generator_joining_after_a_publish_gets_the_newest_version_at_once(tmp_path):
    config = fast_config(ipc_endpoint(), shm_dir=str(tmp_path))
    w = torch.arange(1000.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        assert trainer.publish_weights(1, {"w": w + 1}) == []  # nobody there: kept in shared memory
        assert trainer.publish_weights(2, {"w": w + 2}) == []
        for _ in range(2):  # a first session, then the same process joins again
            with GeneratorPort(config, FINGERPRINT) as gen:
                update = gen.wait_weights(2, timeout_s=10)  # no publish since it joined
                assert update.version == 2 and torch.equal(update.tensors["w"], w + 2)
                update.ack()
                assert trainer.wait_for_acks(2, timeout_s=10, generators=[gen.sender_id]) == {gen.sender_id: True}
                assert gen.poll_weights() is None  # sent once
        with GeneratorPort(config, FINGERPRINT) as gen:
            late = gen.wait_weights(2, timeout_s=10)  # not acked yet: version 2's buffer stays intact
            trainer.publish_weights(3, {"w": w + 3})
            assert torch.equal(late.tensors["w"], w + 2)
            late.ack()
            assert torch.equal(gen.wait_weights(3, timeout_s=10).tensors["w"], w + 3)


def test_a_generator_joining_over_socket_frames_gets_the_newest_version_from_catch_up():
    config = fast_config(tcp_endpoint())  # no shared memory: frames
    w = torch.arange(8.0)
    calls = []

    def weights():
        calls.append(1)
        return {"w": w + 1}

    with TrainerPort(config, FINGERPRINT) as trainer:
        trainer.publish_weights(1, {"w": w + 1})
        assert trainer.catch_up_weights(1, weights) == [] and calls == []  # nobody there: nothing to do
        with GeneratorPort(config, FINGERPRINT) as gen:
            trainer.wait_for_generators(1)
            assert trainer.catch_up_weights(0, weights) == []  # not the newest published version: ignored
            assert trainer.catch_up_weights(1, weights) == [gen.sender_id]
            update = gen.wait_weights(1, timeout_s=10)
            assert update.version == 1 and torch.equal(update.tensors["w"], w + 1)
            update.ack()
            assert trainer.catch_up_weights(1, weights) == [] and calls == [1]  # once per joining generator
            trainer.publish_weights(2, {"w": w + 2})
            assert trainer.catch_up_weights(2, weights) == []  # got it from the publish
            assert torch.equal(gen.wait_weights(2, timeout_s=10).tensors["w"], w + 2)


def test_the_pinned_newest_buffer_is_rewritten_only_when_no_other_can_be_had(tmp_path):
    from rlhf_engine.transport.shm import ShmPool

    pool = ShmPool(str(tmp_path), max_buffers=2)
    first = pool.acquire(4096, 1.0, set())
    pool.pin(first)
    second = pool.acquire(4096, 1.0, set())  # first is free but pinned: a new one
    assert second is not first and pool.hold(first, "late")  # a joiner may still read the newest
    pool.release("late")
    pool.pin(second)
    assert pool.acquire(4096, 1.0, {"a"}) is first  # unpinned and free
    assert pool.acquire(4096, 1.0, {"a"}) is second  # the only free one, though pinned: unpinned
    assert not pool.hold(second, "late")  # being rewritten: a joiner gets the next publish instead
    pool.close()


def test_a_newer_version_replaces_an_untaken_one_which_is_acked_as_skipped():
    sd = {"w": torch.zeros(16)}
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        trainer.wait_for_generators(1)
        trainer.publish_weights(1, {"w": sd["w"] + 1})
        trainer.publish_weights(2, {"w": sd["w"] + 2})
        assert trainer.wait_for_acks(1, timeout_s=10) == {gen.sender_id: False}
        update = gen.wait_weights(2, timeout_s=10)
        assert update.version == 2 and torch.equal(update.tensors["w"], sd["w"] + 2)
        assert gen.poll_weights() is None
        assert gen.wait_weights(2, timeout_s=1) is None  # already has version 2
        with pytest.raises(ValueError, match="must be greater than the last published"):
            trainer.publish_weights(2, sd)


def test_several_generators_each_get_every_update_and_ack_it():
    sd = {"w": torch.randn(64, 64), "i": torch.arange(10)}
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as g1, \
            GeneratorPort(config, FINGERPRINT) as g2:
        trainer.wait_for_generators(2)
        assert sorted(trainer.publish_weights(3, sd)) == sorted([g1.sender_id, g2.sender_id])
        for gen in (g1, g2):
            update = gen.wait_weights(3, timeout_s=10)
            assert torch.equal(update.tensors["w"], sd["w"]) and torch.equal(update.tensors["i"], sd["i"])
            update.ack()
        assert trainer.wait_for_acks(3, timeout_s=10) == {g1.sender_id: True, g2.sender_id: True}


def test_generators_with_and_without_shared_memory_get_the_same_update():
    sd = {"w": torch.randn(1000).bfloat16()}
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as g_shm, \
            GeneratorPort(dataclasses.replace(config, weights_via_shm=False), FINGERPRINT) as g_frames:
        infos = {g.name: g.shm for g in trainer.wait_for_generators(2)}
        assert infos == {g_shm.sender_id: True, g_frames.sender_id: False}
        trainer.publish_weights(1, sd)
        for gen in (g_shm, g_frames):
            update = gen.wait_weights(1, timeout_s=10)
            assert bit_equal(update.tensors["w"], sd["w"])
            update.ack()
        assert set(trainer.wait_for_acks(1, timeout_s=10)) == {g_shm.sender_id, g_frames.sender_id}


class FakeTrainer:
    """A raw ROUTER that answers the handshake and then sends hand-made weight buckets."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(channel_endpoint(endpoint, "control"))
        self.identity = None
        self.sent = 0
        """Messages sent to the generator so far."""
        self.acked: list[tuple[int, bool]] = []

    def accept(self):
        frames = self.sock.recv_multipart()
        self.identity = frames[0]
        self._send(WelcomeHeader(sender="fake", seq=0, shm=False))

    def _send(self, header, tensors=()):
        self.sock.send_multipart([self.identity, *encode(header, list(tensors))])
        self.sent += 1

    def heartbeat(self):
        self._send(HeartbeatHeader(sender="fake", seq=0))

    def bucket(self, version, i, n, named):
        header = WeightsHeader(sender="fake", seq=0, tensors=tuple(tensor_spec(k, t) for k, t in named),
                               weight_version=version, bucket=i, num_buckets=n)
        self._send(header, [t for _, t in named])

    def acks(self) -> list[tuple[int, bool]]:
        """`(weight_version, applied)` of every ack received so far."""
        while self.sock.poll(0):
            header, _ = decode(self.sock.recv_multipart()[1:], WireLimits())
            if isinstance(header, WeightsAckHeader):
                self.acked.append((header.weight_version, header.applied))
        return self.acked

    def close(self):
        self.sock.close()
        self.ctx.term()


def handled_all_sent(gen: GeneratorPort, fake: FakeTrainer) -> None:
    """Until the generator has handled every message `fake` sent so far: one connection, read in order by one IO
    thread, which counts a message as received before it handles it: a heartbeat sent last is counted once every
    message before it was handled."""
    fake.heartbeat()
    wait_until(lambda: gen.stats()["control"].get("received", 0) >= fake.sent, 5, message="the heartbeat sent last")


def test_partial_stale_and_duplicate_updates_are_never_handed_over():
    endpoint = ipc_endpoint()
    fake = FakeTrainer(endpoint)
    accepted = threading.Thread(target=fake.accept)
    accepted.start()
    gen = GeneratorPort(fast_config(endpoint, heartbeat_timeout_s=30, heartbeat_interval_s=0.1), FINGERPRINT)
    accepted.join()
    try:
        a, b = torch.arange(4.0), torch.arange(3)
        fake.bucket(5, 0, 2, [("a", a)])  # half of version 5
        handled_all_sent(gen, fake)
        assert gen.poll_weights() is None  # never half an update
        fake.bucket(6, 0, 2, [("a", a * 6)])  # a newer version drops the unfinished 5
        fake.bucket(5, 1, 2, [("b", b)])  # the rest of 5 can no longer complete it
        fake.bucket(6, 1, 2, [("b", b * 6)])
        update = gen.wait_weights(6, timeout_s=5)
        assert update.version == 6
        assert torch.equal(update.tensors["a"], a * 6) and torch.equal(update.tensors["b"], b * 6)
        fake.bucket(6, 0, 1, [("a", a)])  # duplicate version
        fake.bucket(4, 0, 1, [("a", a)])  # stale version
        fake.bucket(7, 0, 1, [("a", a), ("a", a)])  # repeated tensor name: malformed
        handled_all_sent(gen, fake)
        assert gen.poll_weights() is None
        stats = gen.stats()["control"]
        assert stats["stale_weights"] == 3  # the rest of 5, the duplicate 6, the stale 4
        assert stats["dropped.bad_bucket"] == 1
        update.ack()
        wait_until(lambda: (6, True) in fake.acks(), 5, message="the ack of version 6")
    finally:
        gen.close()
        fake.close()


def test_close_returns_fast_while_a_weight_update_is_in_flight():
    sd = {f"w{i}": torch.randn(2_000_000) for i in range(16)}  # 128 MB over tcp frames
    config = fast_config(tcp_endpoint(), bucket_bytes=8 << 20)
    trainer = TrainerPort(config, FINGERPRINT)
    gen = GeneratorPort(config, FINGERPRINT)
    trainer.wait_for_generators(1)
    errors = []

    def publish():
        try:
            trainer.publish_weights(1, sd, timeout_s=30)
        except Exception as e:  # closing under it may end the publish with TransportClosed
            errors.append(e)

    thread = threading.Thread(target=publish)
    thread.start()
    wait_until(lambda: trainer.stats()["control"].get("weight_bytes_sent", 0), 10, interval_s=0.005,
               message="a first bucket queued")
    assert thread.is_alive(), "the publish ended before the close: nothing was in flight"
    start = time.monotonic()
    gen.close()
    trainer.close()
    assert time.monotonic() - start < 1.0
    thread.join(5)
    assert not thread.is_alive()
    assert all(type(e).__name__ in ("TransportClosed", "TransportError") for e in errors), errors


def test_a_holder_lost_while_publish_waits_does_not_hold_the_buffer_forever(tmp_path):
    """The race of a generator lost while `publish` waits for a free buffer: `forget` ran before the new
    buffer named it as a holder; `assign` (what publish does next, with the live roster) drops it."""
    import threading

    from rlhf_engine.transport.shm import ShmPool

    pool = ShmPool(str(tmp_path), max_buffers=1)
    first = pool.acquire(4096, 1.0, {"a", "b"})
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(4096, 5.0, {"a", "b"})))
    waiter.start()
    pool.release("a")  # generator a lost: forgotten while the publish waits
    pool.release("b", first.path)  # b acks the old version: the buffer is free again
    waiter.join(timeout=5.0)
    segment = got[0]
    assert segment.waiting_for == {"a", "b"}  # named from the roster as it was when the publish began
    pool.assign(segment, {"b"})  # the roster now: a is gone
    assert segment.waiting_for == {"b"}
    pool.release("b", segment.path)
    assert pool.acquire(4096, 0.5, {"b"}).path == segment.path  # free again: nobody holds it forever
    pool.close()


def test_with_the_models_specs_a_publish_takes_one_tensor_at_a_time_into_shared_memory(tmp_path):
    import gc
    import weakref

    sd = {f"w{i}": torch.randn(1000) for i in range(5)} | {"i": torch.arange(6).view(2, 3)}
    specs = state_dict_specs(sd)
    fp = model_fingerprint(specs)
    # gc.collect() below holds the GIL for as long as the test process's heap takes (late in a full run, over
    # the 1.5 s heartbeat timeout): the generators' heartbeat threads must not be dropped meanwhile
    config = fast_config(ipc_endpoint(), shm_dir=str(tmp_path), heartbeat_timeout_s=60.0)
    made: list[weakref.ref] = []

    def on_demand(scale):  # each tensor made when asked for, as a gather from shards makes it
        for name, t in sd.items():
            gc.collect()
            assert all(ref() is None for ref in made[:-1]), "earlier tensors are still referenced"
            fresh = t * scale
            made.append(weakref.ref(fresh))
            yield name, fresh

    with TrainerPort(config, fp, weight_specs=specs) as trainer, \
            GeneratorPort(config, fp, weight_specs=specs) as g_shm, \
            GeneratorPort(dataclasses.replace(config, weights_via_shm=False), fp, weight_specs=specs) as g_frames:
        trainer.wait_for_generators(2)
        assert sorted(trainer.publish_weights(1, on_demand(2))) == sorted([g_shm.sender_id, g_frames.sender_id])
        for gen in (g_shm, g_frames):  # frames are sent from the shared-memory buffer
            update = gen.wait_weights(1, timeout_s=10)
            assert all(torch.equal(update.tensors[k], v * 2) for k, v in sd.items())
            update.ack()
        made.clear()
        with pytest.raises(ValueError, match=r"missing \['i'\]"):
            trainer.publish_weights(2, ((k, v) for k, v in sd.items() if k != "i"))
        with pytest.raises(ValueError, match=r"tensor 'w0' float32\[999\]: the model has float32\[1000\]"):
            trainer.publish_weights(2, {"w0": torch.zeros(999)})
        trainer.publish_weights(2, on_demand(3))  # a failed publish left no buffer held
        assert torch.equal(g_shm.wait_weights(2, timeout_s=10).tensors["w4"], sd["w4"] * 3)
