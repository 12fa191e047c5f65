"""The failure channel: one trainer rank's failure ends every rank within seconds.

Collectives cannot carry a failure. A rank that fails in the middle of an op leaves the others inside a
collective that will never complete: gloo waits for `trainer.timeout_s` (300 s by default), NCCL for its
watchdog, and a rank that is waiting for rank 0's next op code has no way to learn that rank 0 gave up.
So beside the collectives each rank holds a connection to the job's key-value store (the TCPStore that
torchrun's agent serves at MASTER_ADDR:MASTER_PORT), and:

- a rank that fails writes one report there, `rank: Type: message` (the first report of an attempt wins,
  so every rank names the same cause), then ends as it would (rank 0 stops its generators first);
- every rank watches the store from a thread (every `poll_s`). On another rank's report it raises
  `RankFailed` in its main thread (through a signal: it lands as soon as that thread runs Python, e.g.
  while rank 0 waits for rollouts; a gloo collective with the failed rank returns at once when that rank's
  process exits), and if the process is still alive `grace_s` later it runs `on_stuck` and ends itself
  (`os._exit`): a collective with a rank that failed but did not exit, or an NCCL collective, never returns.
- a rank that is killed outright reports nothing: torchrun's agent sees its process exit and stops the
  others (SIGTERM, which the CLI turns into an orderly stop), and gloo collectives with it fail at once.

Why not torchrun alone: it acts on exits, and a rank that failed and is cleaning up (or is stuck) has not
exited yet. Why not a monitored barrier: the ranks would have to meet at it, and rank 0 spends most of a
run outside collectives (waiting for rollouts, talking to generators). The store is there already: every
torchrun job has one, and it lives in the agent, not in a rank that may die.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from rlhf_engine.distributed.group import RankInfo

log = logging.getLogger(__name__)

_KEY = "failed"
_SIGNAL = signal.SIGUSR1


class RankFailed(RuntimeError):
    """Trainer rank `rank` failed with `cause` (`Type: message`); this rank stops because of it."""

    def __init__(self, rank: int, cause: str) -> None:
        super().__init__(f"trainer rank {rank} failed: {cause}")
        self.rank = rank
        self.cause = cause


def describe(error: BaseException) -> str:
    """`Type: message` on one line (what a report carries)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class FailureChannel:
    """This rank's end of the failure channel over `store` (a store only this attempt of the job uses).

    poll_s: how often the watcher reads the store; grace_s: how long after another rank's report this process
    may take to end by itself before the watcher ends it.
    """

    def __init__(self, store: dist.Store, rank: int, *, poll_s: float = 0.1, grace_s: float = 15.0) -> None:
        if poll_s <= 0 or grace_s <= 0:
            raise ValueError(f"poll_s ({poll_s}) and grace_s ({grace_s}) must be > 0")
        self.rank = rank
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._store = store
        self._closed = threading.Event()
        self._failing = threading.Event()  # this rank handles a failure already: no signal into its cleanup
        self._peer: RankFailed | None = None
        self._thread: threading.Thread | None = None
        self._previous_handler = None

    @classmethod
    def connect(cls, info: RankInfo, timeout_s: float, **kwargs) -> "FailureChannel":
        """A channel over the job's store at `info.master_addr:master_port`, keys under this attempt's prefix."""
        store = dist.TCPStore(info.master_addr, info.master_port, is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return cls(dist.PrefixStore(f"rlhf_engine/failure/{info.attempt}/", store), info.rank, **kwargs)

    # ---- reporting ---------------------------------------------------------------------------------------
    def report(self, error: BaseException) -> RankFailed | None:
        """Tell the other ranks that this rank fails with `error`, unless one reported before: then that
        rank's failure is returned (the cause of this one, which is not reported). Never raises: a store that
        cannot be reached leaves the others to torchrun (this rank exits)."""
        self._failing.set()
        if self._peer is not None:
            return self._peer
        try:
            stored = self._store.compare_set(_KEY, "", f"{self.rank}\t{describe(error)}")
        except Exception as e:  # the store went away with the job's agent
            log.warning("trainer rank %d: could not report its failure to the other ranks: %s", self.rank, e)
            return None
        return self._parse(stored)

    def failure(self) -> RankFailed | None:
        """Another rank's reported failure, or None (a read of the store)."""
        if not self._store.check([_KEY]):
            return None
        return self._parse(self._store.get(_KEY))

    def _parse(self, stored: bytes) -> RankFailed | None:
        rank, _, cause = stored.decode(errors="replace").partition("\t")
        return None if int(rank) == self.rank else RankFailed(int(rank), cause)

    # ---- watching --------------------------------------------------------------------------------------
    def watch(self, on_stuck: Callable[[], None] | None = None, exit_code: int = 1) -> None:
        """Start watching for another rank's report (call from the main thread: it installs the signal
        handler that raises `RankFailed` there). `on_stuck` runs, and the process ends with `exit_code`, if it
        is still alive `grace_s` after the report."""
        if self._thread is not None:
            raise RuntimeError("the failure channel is watched already")
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(_SIGNAL, self._raise_in_main)
        self._thread = threading.Thread(target=self._watch, args=(on_stuck, exit_code), daemon=True,
                                        name=f"failure-channel-rank{self.rank}")
        self._thread.start()

    def close(self) -> None:
        """Stop watching (idempotent); restores the signal handler."""
        self._failing.set()  # a signal sent just before lands in a no-op
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.poll_s + 1.0)
        if self._previous_handler is not None:
            signal.signal(_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def _raise_in_main(self, signum, frame) -> None:
        if self._peer is not None and not self._failing.is_set():
            self._failing.set()
            raise self._peer

    def _watch(self, on_stuck: Callable[[], None] | None, exit_code: int) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                peer = self.failure()
            except Exception as e:  # the store is gone: the job's agent ended (it stops this rank too)
                log.warning("trainer rank %d: the job's store stopped answering (%s)", self.rank, e)
                return
            if peer is None:
                continue
            self._peer = peer
            log.error("trainer rank %d stops: %s", self.rank, peer)
            if self._previous_handler is not None:
                signal.pthread_kill(threading.main_thread().ident, _SIGNAL)
            if self._closed.wait(self.grace_s):
                return
            log.error("trainer rank %d did not end within %.0f s of %s; ending it now", self.rank, self.grace_s, peer)
            try:
                if on_stuck is not None:
                    on_stuck()
            finally:
                logging.shutdown()
                os._exit(exit_code)
