"""The failure channel on its own (two ranks' ends over one in-process store): the first report wins and names its
rank, a rank never reads its own report as another's, and a watched main thread gets `RankFailed` raised in it."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from rlhf_engine.engine.ranks.failure import FailureChannel, RankFailed
from tests.helpers.waiting import wait_until


class CountingStore:
    """`store` that counts the watcher's reads (`check`): a read counted after an event began after it."""

    def __init__(self, store) -> None:
        self._store = store
        self.checks = 0

    def check(self, keys):
        self.checks += 1
        return self._store.check(keys)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    return dist.PrefixStore("test/", server)


def test_the_first_report_wins_and_names_its_rank(store):
    rank0, rank1 = FailureChannel(store, 0), FailureChannel(store, 1)
    assert rank0.failure() is None and rank1.failure() is None
    assert rank1.report(ValueError("bad  batch\n on rank 1")) is None  # its own: reported
    seen = rank0.failure()
    assert isinstance(seen, RankFailed) and (seen.rank, seen.cause) == (1, "ValueError: bad batch on rank 1")
    assert str(seen) == "trainer rank 1 failed: ValueError: bad batch on rank 1"
    assert rank1.failure() is None  # a rank's own report is not another's failure
    # rank 0 fails afterwards (e.g. its collective with rank 1 broke): rank 1's report is the cause
    cause = rank0.report(RuntimeError("Connection closed by peer"))
    assert (cause.rank, cause.cause) == (1, "ValueError: bad batch on rank 1")
    assert rank1.failure() is None


def test_a_watched_main_thread_gets_the_other_ranks_failure_raised(store):
    rank0, rank1 = FailureChannel(store, 0, poll_s=0.05), FailureChannel(store, 1)
    rank0.watch(on_stuck=lambda: pytest.fail("ended by force"))
    try:
        rank1.report(KeyError("prompt 3"))
        with pytest.raises(RankFailed, match=r"trainer rank 1 failed: KeyError: 'prompt 3'"):
            wait_until(lambda: False, 10.0, message="RankFailed raised")  # rank 0 waiting for rollouts, say
    finally:
        rank0.close()


def test_no_signal_lands_in_a_rank_that_handles_its_own_failure(store):
    counting = CountingStore(store)
    rank0, rank1 = FailureChannel(counting, 0, poll_s=0.05), FailureChannel(store, 1)
    rank0.watch()
    try:
        assert rank0.report(RuntimeError("own")) is None  # rank 0 is failing by itself, cleaning up now
        rank1.report(RuntimeError("later"))  # not stored (first report wins), nothing raised in rank 0
        # two reads of rank 0's watcher after the later report (the first may have begun before it): a signal it
        # sent would have raised RankFailed here, in this (main) thread
        reads = counting.checks
        wait_until(lambda: counting.checks >= reads + 2, 5, message="two reads of rank 0's watcher")
    finally:
        rank0.close()
    assert FailureChannel(store, 2).failure().cause == "RuntimeError: own"


def test_bad_timing_settings_are_refused(store):
    with pytest.raises(ValueError, match=r"poll_s \(0\) and grace_s \(1\.0\) must be > 0"):
        FailureChannel(store, 0, poll_s=0, grace_s=1.0)
