"""Rollouts through real sockets: across processes, in order, de-duplicated, back-pressured."""

import multiprocessing as mp
import time

import pytest
import torch

from tests.helpers.peers import FINGERPRINT, fast_config, generator_main, ipc_endpoint, make_rollout, tcp_endpoint
from rlhf_engine.transport import BackpressureTimeout, GeneratorPort, TrainerPort


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
            deadline = time.monotonic() + 120
            while sum(map(len, got.values())) < 2 * n_per_sender and time.monotonic() < deadline:
                for r in trainer.recv_rollouts(512, timeout_s=1.0):
                    sender, i = (int(x) for x in r.rollout_id[1:].split("-"))
                    got[sender].append(i)
                    if i % 997 == 0:  # spot-check the payload bit-exactly
                        ref = make_rollout(sender, i, prompt_len=16, response_len=32)
                        assert torch.equal(r.prompt_token_ids, ref.prompt_token_ids)
                        assert torch.equal(r.response_token_ids, ref.response_token_ids)
                        assert torch.equal(r.logprobs, ref.logprobs)
            time.sleep(0.3)  # anything extra (a duplicate) would arrive now
            assert trainer.recv_rollout(timeout_s=0.2) is None
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
            got += [int(r.rollout_id.split("-")[1]) for r in batch]
        assert got == list(range(sent))
        gen.send_rollout(make_rollout(0, sent, 512, 512), timeout_s=5)  # unblocked again
        assert trainer.recv_rollout(timeout_s=5).rollout_id == f"g0-{sent}"


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


def test_a_rollout_id_repeated_for_another_prompt_is_not_a_duplicate():
    """A re-issued subset of a batch may reach the same generator, which numbers its prompts
    from 0 again: the id repeats, the prompt does not."""
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        first, reissued, again = make_rollout(0, 0, 4, 4), make_rollout(0, 1, 4, 4), make_rollout(0, 1, 4, 4)
        first.rollout_id = reissued.rollout_id = again.rollout_id = "gen/7/0/0"  # prompts 0, 1, 1
        for r in (first, reissued, again):
            gen.send_rollout(r)
        got = [trainer.recv_rollout(timeout_s=5) for _ in range(2)]
        assert [(r.prompt_id, r.rollout_id) for r in got] == [(0, "gen/7/0/0"), (1, "gen/7/0/0")]
        assert trainer.recv_rollout(timeout_s=0.5) is None
        assert trainer.drop_counts() == {"duplicate": 1}
