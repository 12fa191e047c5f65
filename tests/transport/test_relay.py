"""Relay of weight updates among the generators of one host: one tcp copy per host, the rest through the
leader's shared memory; every failure of the leader falls back to frames, nothing hangs.

The trainer has shared memory off and the generators on, so that generators on this host look like
generators on another host to it (tcp frames), and like one host to each other."""

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from rlhf_engine.transport import GeneratorPort, TrainerPort, TransportConfig
from rlhf_engine.transport.shm import layout, owned_prefix
from tests.helpers.peers import FINGERPRINT, fast_config, tcp_endpoint
from tests.helpers.waiting import wait_until
from tests.transport._relay_peers import LyingPeer, fake_file, taking_generator_main


def state_dict(scale: float) -> dict[str, torch.Tensor]:
    """fp32, bf16 and int64 tensors of odd shapes (odd byte counts: the layout pads them)."""
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(37, 129, generator=g) * scale,
            "a.bias": (torch.randn(1001, generator=g) * scale).bfloat16(),
            "steps": torch.arange(13) * int(scale)}


SIZE = sum(t.numel() * t.element_size() for t in state_dict(1).values())
LAYOUT_SIZE = layout([t.numel() * t.element_size() for t in state_dict(1).values()])[1]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def configs(shm_dir, **trainer_fields) -> tuple[TransportConfig, TransportConfig]:
    """(trainer, generator) configs: tcp, the trainer without shared memory, the generators with it."""
    endpoint = tcp_endpoint()
    trainer = fast_config(endpoint, weights_via_shm=False, heartbeat_timeout_s=5.0, **trainer_fields)
    return trainer, fast_config(endpoint, weights_via_shm=True, shm_dir=str(shm_dir), heartbeat_timeout_s=5.0)


def bytes_sent(trainer: TrainerPort) -> int:
    return trainer.stats()["control"].get("weight_bytes_sent", 0)


def take(gens, version: int, sd) -> None:
    """Each generator gets ``version`` bit-exact and acks it."""
    for gen in gens:
        update = gen.wait_weights(version, timeout_s=10)
        assert update.version == version
        assert list(update.tensors) == list(sd) and all(bit_equal(update.tensors[k], v) for k, v in sd.items())
        update.ack()


def catch_up_until(trainer: TrainerPort, version: int, sd, expected: list[str], timeout_s: float = 15) -> None:
    """Call ``catch_up_weights`` as the engine does (while it waits for rollouts) until it sends ``expected``."""
    sent = []

    def sent_all() -> bool:
        sent.extend(trainer.catch_up_weights(version, lambda: sd))  # each once
        return len(sent) >= len(expected)

    wait_until(sent_all, timeout_s, interval_s=0.05,
               message=lambda: f"catch_up_weights({version}) sending {expected} (sent {sent})")
    assert sorted(sent) == sorted(expected)


def relay_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if "-relay-" in n)


def test_one_copy_per_host_reaches_every_generator_bit_exact_and_the_leaders_buffer_is_reused(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    with TrainerPort(tcfg, FINGERPRINT) as trainer:
        gens = [GeneratorPort(gcfg, FINGERPRINT, name=f"g{i}") for i in range(3)]
        try:
            assert [g.host_shm and not g.shm for g in trainer.wait_for_generators(3)] == [True] * 3
            files = []
            for version in (1, 2, 3):
                sd, before = state_dict(version), bytes_sent(trainer)
                assert sorted(trainer.publish_weights(version, sd)) == sorted(g.sender_id for g in gens)
                take(gens, version, sd)
                assert trainer.wait_for_acks(version, timeout_s=10) == {g.sender_id: True for g in gens}
                assert bytes_sent(trainer) - before == SIZE  # one copy on the wire, not three
                files.append(relay_files(tmp_path))
            # the leader (the longest-lived) copied each version into the same file: released by the trainer
            # once both followers acked, before the next version's frames reached it
            assert len(files[0]) == 1 and files == [files[0]] * 3
            assert files[0][0].startswith(owned_prefix("relay"))
            assert trainer.drop_counts() == {}
        finally:
            for gen in gens:
                gen.close()
    assert os.listdir(tmp_path) == []  # the leader removed its file on close


def one_version(trainer_config: TransportConfig, generator_configs: list[TransportConfig], shm_dir) -> tuple[int, list]:
    """Publish one version to generators of ``generator_configs``, each takes it bit-exact: (bytes the trainer
    sent, relay files in ``shm_dir`` once they took it)."""
    with TrainerPort(trainer_config, FINGERPRINT) as trainer, contextlib.ExitStack() as stack:
        gens = [stack.enter_context(GeneratorPort(c, FINGERPRINT)) for c in generator_configs]
        trainer.wait_for_generators(len(gens))
        sd = state_dict(2)
        trainer.publish_weights(1, sd)
        take(gens, 1, sd)
        return bytes_sent(trainer), relay_files(shm_dir)


def test_relay_off_sends_every_generator_its_own_copy(tmp_path):
    tcfg, gcfg = configs(tmp_path, relay=False)
    assert one_version(tcfg, [gcfg, gcfg], tmp_path) == (2 * SIZE, [])


def test_tcp_generators_relay_with_the_default_config(tmp_path):
    # weights_via_shm unset everywhere: a tcp trainer offers no shared memory, its generators still relay
    endpoint = tcp_endpoint()
    trainer_cfg = fast_config(endpoint, heartbeat_timeout_s=5.0)
    gen_cfg = fast_config(endpoint, shm_dir=str(tmp_path), heartbeat_timeout_s=5.0)
    assert not trainer_cfg.use_shm and gen_cfg.generator_shm
    sent, files = one_version(trainer_cfg, [gen_cfg, gen_cfg], tmp_path)
    assert sent == SIZE and len(files) == 1


def test_generators_that_cannot_use_shared_memory_or_are_alone_on_their_host_get_frames(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    frames_only = dataclasses.replace(gcfg, weights_via_shm=False)
    # one relay-capable generator on this host: nobody to relay to
    assert one_version(tcfg, [gcfg, frames_only], tmp_path) == (2 * SIZE, [])


def test_a_generator_joining_after_a_relayed_version_gets_it_from_catch_up(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    sd = state_dict(4)
    with TrainerPort(tcfg, FINGERPRINT) as trainer, GeneratorPort(gcfg, FINGERPRINT) as g1, \
            GeneratorPort(gcfg, FINGERPRINT) as g2:
        trainer.wait_for_generators(2)
        trainer.publish_weights(1, sd)
        take([g1, g2], 1, sd)
        with GeneratorPort(gcfg, FINGERPRINT) as late:
            trainer.wait_for_generators(3)
            assert trainer.catch_up_weights(1, lambda: sd) == [late.sender_id]
            take([late], 1, sd)
            sd2 = state_dict(5)
            before = bytes_sent(trainer)
            trainer.publish_weights(2, sd2)  # now relayed to it too
            take([g1, g2, late], 2, sd2)
            assert bytes_sent(trainer) - before == SIZE


def test_followers_get_the_version_from_catch_up_when_the_leader_is_killed_and_later_ones_from_a_new_leader(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    tcfg = dataclasses.replace(tcfg, heartbeat_timeout_s=1.5)  # the killed leader is lost soon
    ready = str(tmp_path.parent / f"{tmp_path.name}-leader-ready")
    with TrainerPort(tcfg, FINGERPRINT) as trainer:
        leader = mp.get_context("spawn").Process(target=taking_generator_main, args=(gcfg, "leader", ready))
        leader.start()
        try:
            trainer.wait_for_generators(1, timeout_s=60)  # joins first: the longest-lived member leads
            with GeneratorPort(gcfg, FINGERPRINT, name="f1") as f1, GeneratorPort(gcfg, FINGERPRINT, name="f2") as f2:
                trainer.wait_for_generators(3)
                sd1 = state_dict(1)
                trainer.publish_weights(1, sd1)
                take([f1, f2], 1, sd1)
                assert bytes_sent(trainer) == SIZE
                assert [n.split("-")[2].split(".")[0] for n in relay_files(tmp_path)] == [str(leader.pid)]

                os.kill(leader.pid, signal.SIGKILL)
                leader.join(10)
                sd2 = state_dict(2)
                trainer.publish_weights(2, sd2)  # frames to a dead leader: its followers wait for it, then catch up
                catch_up_until(trainer, 2, sd2, [f1.sender_id, f2.sender_id])
                assert [(g.name.split("@")[0], g.state) for g in trainer.pop_lost_generators()] == [("leader", "lost")]
                take([f1, f2], 2, sd2)
                assert bytes_sent(trainer) == 4 * SIZE  # v1 once, v2 to the dead leader and to each follower

                sd3 = state_dict(3)
                trainer.publish_weights(3, sd3)  # a new leader: f1, the longest-lived left
                take([f1, f2], 3, sd3)
                assert bytes_sent(trainer) == 5 * SIZE
                assert trainer.wait_for_acks(3, timeout_s=10) == {f1.sender_id: True, f2.sender_id: True}
                with GeneratorPort(gcfg, FINGERPRINT, name="f3"):  # a starting generator sweeps the dead one's file
                    assert [n.split("-")[2].split(".")[0] for n in relay_files(tmp_path)] == [str(os.getpid())]
        finally:
            if leader.is_alive():
                leader.kill()
            leader.join(10)
    assert os.listdir(tmp_path) == []


def test_a_leader_that_closes_mid_run_removes_its_file_and_a_new_leader_relays_the_next_version(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    with TrainerPort(tcfg, FINGERPRINT) as trainer:
        leader = GeneratorPort(gcfg, FINGERPRINT, name="leader")
        with GeneratorPort(gcfg, FINGERPRINT) as f1, GeneratorPort(gcfg, FINGERPRINT) as f2:
            try:
                trainer.wait_for_generators(3)
                sd1 = state_dict(1)
                trainer.publish_weights(1, sd1)
                updates = [f.wait_weights(1, timeout_s=10) for f in (f1, f2)]  # views of the leader's file
                assert len(relay_files(tmp_path)) == 1
            finally:
                leader.close()  # before its followers acked
            assert relay_files(tmp_path) == []
            for update in updates:  # their mappings outlive the file's name
                assert all(bit_equal(update.tensors[k], v) for k, v in sd1.items())
                update.ack()
            wait_until(lambda: len(trainer.generators()) <= 2, 10, message="the closed leader gone from the roster")
            sd2 = state_dict(2)
            trainer.publish_weights(2, sd2)
            take([f1, f2], 2, sd2)
            assert bytes_sent(trainer) == 2 * SIZE and len(relay_files(tmp_path)) == 1
    assert os.listdir(tmp_path) == []


def test_a_leader_with_every_buffer_held_does_not_relay_and_its_followers_get_frames(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    with TrainerPort(tcfg, FINGERPRINT) as trainer, \
            GeneratorPort(dataclasses.replace(gcfg, shm_buffers=1), FINGERPRINT, name="leader") as leader, \
            GeneratorPort(gcfg, FINGERPRINT) as f1, GeneratorPort(gcfg, FINGERPRINT) as f2:
        trainer.wait_for_generators(3)
        sd1, sd2 = state_dict(1), state_dict(2)
        trainer.publish_weights(1, sd1)
        held = leader.wait_weights(1, timeout_s=10)  # taken, not acked yet: its one relay buffer stays held
        take([f1, f2], 1, sd1)
        trainer.publish_weights(2, sd2)
        catch_up_until(trainer, 2, sd2, [f1.sender_id, f2.sender_id], timeout_s=5)  # told at once: no wait
        take([f1, f2, leader], 2, sd2)
        assert all(bit_equal(held.tensors[k], v) for k, v in sd1.items())  # its buffer was never rewritten
        held.ack()
        assert bytes_sent(trainer) == 4 * SIZE and trainer.drop_counts() == {}


def test_a_leader_whose_shared_memory_is_full_does_not_relay_and_its_followers_get_frames(tmp_path, monkeypatch):
    def full(fd, offset, size):  # what a full tmpfs answers (a sparse file would SIGBUS the writer instead)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rlhf_engine.transport.shm.os.posix_fallocate", full)
    tcfg, gcfg = configs(tmp_path)
    with TrainerPort(tcfg, FINGERPRINT) as trainer, GeneratorPort(gcfg, FINGERPRINT, name="leader") as leader, \
            GeneratorPort(gcfg, FINGERPRINT) as f1, GeneratorPort(gcfg, FINGERPRINT) as f2:
        trainer.wait_for_generators(3)
        sd = state_dict(1)
        trainer.publish_weights(1, sd)
        catch_up_until(trainer, 1, sd, [f1.sender_id, f2.sender_id], timeout_s=5)  # told at once: no wait
        take([leader, f1, f2], 1, sd)
        assert bytes_sent(trainer) == 3 * SIZE and os.listdir(tmp_path) == []


def test_a_slow_relay_copy_does_not_stop_the_leaders_heartbeats(tmp_path, monkeypatch):
    from rlhf_engine.transport.relay import RelayLeader

    copy = RelayLeader.relay

    def slow(self, version, complete):  # a copy that takes longer than the heartbeat timeout (a large model)
        time.sleep(2.5)
        return copy(self, version, complete)

    monkeypatch.setattr(RelayLeader, "relay", slow)
    tcfg, gcfg = configs(tmp_path)
    tcfg = dataclasses.replace(tcfg, heartbeat_timeout_s=1.5)
    gcfg = dataclasses.replace(gcfg, heartbeat_timeout_s=1.5)
    with TrainerPort(tcfg, FINGERPRINT) as trainer, GeneratorPort(gcfg, FINGERPRINT, name="leader") as leader, \
            GeneratorPort(gcfg, FINGERPRINT) as f1:
        trainer.wait_for_generators(2)
        sd = state_dict(1)
        trainer.publish_weights(1, sd)
        take([leader, f1], 1, sd)
        assert trainer.pop_lost_generators() == [] and bytes_sent(trainer) == SIZE


def _outside(tmp_path):
    other = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    other.mkdir(exist_ok=True)
    return dict(shm_path=fake_file(str(other), LAYOUT_SIZE), shm_size=LAYOUT_SIZE)


LIES = {
    # the followers' checks refuse the file: each acks it as refused
    "path outside the followers' shm_dir": (_outside, "bad_shm"),
    "file shorter than its size": (lambda d: dict(shm_path=fake_file(str(d), 64), shm_size=LAYOUT_SIZE), "bad_shm"),
    # the trainer refuses the header itself
    "size that is not the layout's": (lambda d: dict(shm_path=fake_file(str(d), 2 * LAYOUT_SIZE),
                                                     shm_size=2 * LAYOUT_SIZE), None),
    "a version it was not asked to relay": (lambda d: dict(shm_path=fake_file(str(d), LAYOUT_SIZE),
                                                           shm_size=LAYOUT_SIZE, weight_version=99), None),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_leader_is_dropped_and_counted_and_its_followers_still_get_correct_weights(tmp_path, lie):
    make, follower_drop = LIES[lie]
    tcfg, gcfg = configs(tmp_path, ack_timeout_s=1.0)  # the longest a leader may take to relay
    fields = make(tmp_path)
    liar = LyingPeer(tcfg.endpoint, lambda version: {"weight_version": version} | fields)
    with TrainerPort(tcfg, FINGERPRINT) as trainer:
        try:
            trainer.wait_for_generators(1)  # joins first: it leads
            with GeneratorPort(gcfg, FINGERPRINT) as f1, GeneratorPort(gcfg, FINGERPRINT) as f2:
                trainer.wait_for_generators(3)
                sd1 = state_dict(1)
                trainer.publish_weights(1, sd1)
                catch_up_until(trainer, 1, sd1, [f1.sender_id, f2.sender_id])
                take([f1, f2], 1, sd1)
                assert liar.relay_requests == [1]
                drops = trainer.drop_counts()
                assert drops == {"bad_relay": 2 if follower_drop else 1}  # each refusal, or the header itself
                if follower_drop:
                    assert [f.drop_counts() for f in (f1, f2)] == [{follower_drop: 1}] * 2
                sd2 = state_dict(2)
                before = bytes_sent(trainer)
                trainer.publish_weights(2, sd2)  # it leads no more: f1 relays to f2 (and to the liar)
                take([f1, f2], 2, sd2)
                assert liar.relay_requests == [1] and bytes_sent(trainer) - before == SIZE
        finally:
            liar.close()
    made_here = os.path.dirname(fields["shm_path"]) == str(tmp_path)
    assert os.listdir(tmp_path) == ([os.path.basename(fields["shm_path"])] if made_here else [])  # relay files gone


def test_a_relayed_header_from_a_generator_that_does_not_lead_is_dropped_and_counted(tmp_path):
    tcfg, gcfg = configs(tmp_path)
    fields = dict(shm_path=fake_file(str(tmp_path), LAYOUT_SIZE), shm_size=LAYOUT_SIZE)
    with TrainerPort(tcfg, FINGERPRINT) as trainer, GeneratorPort(gcfg, FINGERPRINT) as leader, \
            GeneratorPort(gcfg, FINGERPRINT) as f1:
        trainer.wait_for_generators(2)
        liar = LyingPeer(tcfg.endpoint, lambda version: {"weight_version": version} | fields, always=True)
        try:
            trainer.wait_for_generators(3)
            sd = state_dict(7)
            trainer.publish_weights(1, sd)
            take([leader, f1], 1, sd)
            wait_until(lambda: trainer.drop_counts().get("bad_relay", 0) >= 1, 10, message="bad_relay counted")
            assert trainer.drop_counts() == {"bad_relay": 1} and liar.relay_requests == []
            assert bytes_sent(trainer) == SIZE
        finally:
            liar.close()


def test_the_relay_switch_is_validated():
    with pytest.raises(ValueError, match="relay must be true or false, got 'yes'"):
        TransportConfig(relay="yes")
