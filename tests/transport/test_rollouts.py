"""Rollouts through real sockets: across processes, in order, de-duplicated, back-pressured, and bounded: in
size (the configured lengths, the socket's message limit) and in the trainer's memory under a flood."""

import multiprocessing as mp
import time

import pytest
import torch

from rlhf_engine.transport import BackpressureTimeout, GeneratorPort, TrainerPort, rollout_memory_bound
from rlhf_engine.transport.config import rollout_limits
from tests.helpers.peers import (
    FINGERPRINT,
    fast_config,
    flood_main,
    generator_main,
    ipc_endpoint,
    make_rollout,
    rss_bytes,
    spawn,
    tcp_endpoint,
)
from tests.helpers.waiting import wait_until


@pytest.mark.parametrize("make_endpoint", [
    pytest.param(ipc_endpoint, id="ipc"),
    pytest.param(tcp_endpoint, id="tcp", marks=pytest.mark.slow),  # same code path; tcp is covered by other tests too
])
def test_10k_rollouts_from_two_processes_none_lost_none_duplicated_in_order(make_endpoint):
    n_per_sender, duplicates = 5000, 50
    config = fast_config(make_endpoint())
    ctx = mp.get_context("spawn")
    with TrainerPort(config, FINGERPRINT) as trainer:
        procs = [ctx.Process(target=generator_main, args=(config, s, n_per_sender, duplicates)) for s in (1, 2)]
        for p in procs:
            p.start()
        try:
            trainer.wait_for_generators(2, timeout_s=60)
            got: dict[int, list[int]] = {1: [], 2: []}

            def received_all() -> bool:
                for r in trainer.recv_rollouts(512, timeout_s=1.0):
                    sender, i = (int(x) for x in r.sample_id[1:].split("-"))
                    got[sender].append(i)
                    if i % 997 == 0:  # spot-check the payload bit-exactly
                        ref = make_rollout(sender, i, prompt_len=16, response_len=32)
                        assert torch.equal(r.prompt_ids, ref.prompt_ids)
                        assert torch.equal(r.response_ids, ref.response_ids)
                        assert torch.equal(r.behaviour_logp, ref.behaviour_logp)
                return sum(map(len, got.values())) >= 2 * n_per_sender

            wait_until(received_all, 120, interval_s=0, message=f"{2 * n_per_sender} rollouts")
            # each sender's last message was its rollout n - 1, received: whatever it sent before (its duplicates)
            # was handled before it, dropped and counted or queued ahead of it (and read: a duplicate in `got`)
            assert trainer.recv_rollout(timeout_s=0) is None
            assert got[1] == list(range(n_per_sender))
            assert got[2] == list(range(n_per_sender))
            assert trainer.drop_counts() == {"duplicate": 2 * duplicates}
            trainer.shutdown_generators("test done")
            for p in procs:
                p.join(30)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()


def test_slow_trainer_blocks_the_generator_with_bounded_queues_then_delivers_everything(caplog):
    config = fast_config(ipc_endpoint(), rollout_queue_size=8, rollout_hwm=4, blocked_log_s=0.2)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        sent = 0
        with pytest.raises(BackpressureTimeout, match="receiver is not consuming"):
            for i in range(10_000):
                gen.send_rollout(make_rollout(0, i, 512, 512), timeout_s=0.5)  # ~10 KiB each
                sent += 1
        assert "send blocked for" in caplog.text and "back-pressure" in caplog.text
        # in flight at most: 2 queues (8 each) + 2 high-water marks (4 each) + what the OS socket
        # buffers hold (~200 KiB each way here, i.e. ~40 of these rollouts)
        assert 8 + 8 <= sent <= 8 + 8 + 4 + 4 + 64
        assert gen.rollout_queue_depth == 8 + 1  # the full queue and one waiting for the socket
        assert trainer.rollout_queue_depth == 8
        got = []
        while len(got) < sent:
            batch = trainer.recv_rollouts(64, timeout_s=5)
            assert batch, f"only {len(got)} of {sent} rollouts arrived"
            got += [int(r.sample_id.split("-")[1]) for r in batch]
        assert got == list(range(sent))
        gen.send_rollout(make_rollout(0, sent, 512, 512), timeout_s=5)  # unblocked again
        assert trainer.recv_rollout(timeout_s=5).sample_id == f"g0-{sent}"


def test_close_of_both_ends_is_fast_with_rollouts_in_flight():
    config = fast_config(tcp_endpoint(), rollout_queue_size=64, rollout_hwm=16, linger_ms=200)
    trainer = TrainerPort(config, FINGERPRINT)
    gen = GeneratorPort(config, FINGERPRINT)
    for i in range(60):  # the trainer reads none of them
        gen.send_rollout(make_rollout(0, i, 512, 512), timeout_s=5)
    assert gen.rollout_queue_depth + trainer.rollout_queue_depth > 0
    start = time.monotonic()
    gen.close()
    trainer.close()
    assert time.monotonic() - start < 1.0
    gen.close()  # idempotent
    trainer.close()


def test_a_sample_id_repeated_for_another_prompt_is_not_a_duplicate():
    """A re-issued subset of a batch may reach the same generator, which numbers its prompts
    from 0 again: the id repeats, the prompt does not."""
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        first, reissued, again = make_rollout(0, 0, 4, 4), make_rollout(0, 1, 4, 4), make_rollout(0, 1, 4, 4)
        first.sample_id = reissued.sample_id = again.sample_id = "gen/7/0/0"  # prompts 0, 1, 1
        last = make_rollout(0, 2, 4, 4)  # sent after the repeat: received, the repeat was handled before it
        for r in (first, reissued, again, last):
            gen.send_rollout(r)
        got = [trainer.recv_rollout(timeout_s=5) for _ in range(3)]
        assert [(r.prompt_id, r.sample_id) for r in got] == [(0, "gen/7/0/0"), (1, "gen/7/0/0"), (2, "g0-2")]
        assert trainer.recv_rollout(timeout_s=0) is None
        assert trainer.drop_counts() == {"duplicate": 1}


def test_a_rollout_over_the_configured_lengths_is_dropped_and_counted():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=16, max_response_tokens=32)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        gen.send_rollout(make_rollout(0, 0, 16, 33))  # one response token too many
        gen.send_rollout(make_rollout(0, 1, 17, 8))  # one prompt token too many
        gen.send_rollout(make_rollout(0, 2, 16, 32))  # the largest allowed
        assert trainer.recv_rollout(timeout_s=5).sample_id == "g0-2"
        # both within the message total (which allows a turn start per response token): decoded, then dropped
        assert trainer.drop_counts() == {"rollout_too_large": 2}


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
            huge.sample_id = f"huge-{i}"
            gen.send_rollout(huge, timeout_s=30)
        gen.send_rollout(make_rollout(0, 1, 16, 16), timeout_s=30)
        del huge
        got = trainer.recv_rollout(timeout_s=30)
        assert got is not None and got.sample_id == "g0-1"
        assert trainer.recv_rollout(timeout_s=0) is None  # sent before g0-1: one that got in would have come first
    assert rss_bytes() - before < 96 << 20


def test_a_flood_of_the_largest_allowed_rollouts_stays_within_the_stated_bound():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=32768, max_response_tokens=32768, rollout_hwm=16,
                         rollout_queue_bytes=16 << 20, heartbeat_timeout_s=30)
    bound = rollout_memory_bound(config, generators=1)
    message = rollout_limits(config).max_message_bytes
    # ids; log-probs, versions, loss mask and (at most) a turn start per response token
    assert message == 8 * 65536 + (4 + 8 + 1 + 8) * 32768
    n = 300  # ~190 MiB offered, several times the bound
    assert n * message > 4 * bound
    with TrainerPort(config, FINGERPRINT) as trainer:
        before = rss_bytes()
        proc = spawn(flood_main, config, n, 32768, 32768)
        try:
            trainer.wait_for_generators(1, timeout_s=60)
            peak, last_change, depth = 0, time.monotonic(), -1

            def stalled() -> bool:  # the queue's depth unchanged for 3 s: every buffer on the way is full
                nonlocal peak, last_change, depth
                peak = max(peak, rss_bytes() - before)
                if trainer.rollout_queue_depth != depth:
                    depth, last_change = trainer.rollout_queue_depth, time.monotonic()
                return time.monotonic() - last_change >= 3

            wait_until(stalled, 120, interval_s=0.05, message="the flood stalled by back-pressure")
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
