"""Rank 0 leads, the other ranks follow: every collective the engine needs, announced by an op code.

Rank 0 runs the engine (sockets, data, logs) and calls `Leader` methods at each point where all ranks must
join in; `follow` is the whole life of every other rank: wait for the next op code (a broadcast int64),
then take part in that collective. The run ends when rank 0 sends STOP, which it does only while no op is
under way (the followers wait for the next op code). A failure in the middle of an op leaves the other ranks
inside a collective that never completes: rank 0 then sends nothing more, and the ranks end through the
failure channel instead (`distributed.failure`).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed.batch import broadcast_samples
from rlhf_engine.distributed.comm import Comm


class Op(enum.IntEnum):
    STEP = 1  # a PPO step on the broadcast batch
    WEIGHTS = 2  # gather the full policy weights (rank 0 publishes them)
    SAVE = 3  # write a sharded checkpoint
    STOP = 4  # leave
    SCORE = 5  # score the broadcast samples (held-out evaluation), each rank its share


def _run_step(trainer, comm: Comm, batch: SampleBatch | None) -> dict[str, float]:
    return trainer.step_batch(broadcast_samples(comm, batch))


def _run_score(trainer, comm: Comm, batch: SampleBatch | None) -> torch.Tensor:
    batch = broadcast_samples(comm, batch)
    return trainer.score(batch.prompt_ids, batch.response_ids, batch.columns, batch.loss_mask)


class Leader:
    """Rank 0's side. With one rank every method is the plain local call."""

    def __init__(self, comm: Comm, trainer, save: Callable[..., Path]) -> None:
        if not comm.is_main:
            raise ValueError(f"Leader runs on rank 0, not rank {comm.rank}")
        self.comm = comm
        self.trainer = trainer
        self._save = save
        self._stopped = False
        self.busy: Op | None = None
        """The op under way on the ranks (announced, not yet completed here), or None: the followers wait for an
        op code (always None on one rank)."""

    def _begin(self, op: Op) -> None:
        if not self.comm.distributed:  # one rank: nobody follows
            return
        if self.busy is not None:
            raise RuntimeError(f"trainer ranks: {op.name} announced while {self.busy.name} is under way")
        self.busy = op
        self.comm.broadcast_(torch.tensor([int(op)], dtype=torch.int64))

    def step(self, batch: SampleBatch) -> dict[str, float]:
        self._begin(Op.STEP)
        stats = _run_step(self.trainer, self.comm, batch)
        self.busy = None
        return stats

    def score(self, batch: SampleBatch) -> torch.Tensor:
        """Scores [n] of the batch's samples from the reward model or function, every rank scoring its share (the
        batch padded to a multiple of the world size with copies of its last sample, whose scores are dropped)."""
        n, pad = len(batch), -len(batch) % self.comm.world_size
        if pad:
            columns = {k: list(v) + [v[-1]] * pad for k, v in batch.columns.items()} if batch.columns else None
            batch = SampleBatch(batch.prompt_ids + batch.prompt_ids[-1:] * pad,
                                batch.response_ids + batch.response_ids[-1:] * pad,
                                loss_mask=batch.loss_mask + batch.loss_mask[-1:] * pad, columns=columns)
        self._begin(Op.SCORE)
        scores = _run_score(self.trainer, self.comm, batch)
        self.busy = None
        return scores[:n]

    def weights(self, *, adapters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """What the generators take each version, `trainer.policy_weights(adapters=...)` at every world size:
        the LoRA adapters (`adapters`, one rank) or the full policy weights (gathered from the shards on
        ranks, the other ranks alongside: drain the iterator before the next op)."""
        if adapters:  # LoRA trains on one rank: nobody follows
            return self.trainer.policy_weights(adapters=True)
        self._begin(Op.WEIGHTS)
        return self._until_drained(self.trainer.policy_weights())

    def _until_drained(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        yield from items
        self.busy = None

    def save(self, *args) -> Path:
        """Write a sharded checkpoint: `save(*args)` here, the followers' own `save()` alongside."""
        self._begin(Op.SAVE)
        path = self._save(*args)
        self.busy = None
        return path

    def stop(self) -> bool:
        """Release the other ranks (idempotent); returns whether they were released. Not while an op is under
        way: the followers are inside its collectives, where an op code would be taken for the op's data (they
        end through the failure channel)."""
        if self._stopped or not self.comm.distributed:
            self._stopped = True
            return True
        if self.busy is not None:
            return False
        self.comm.broadcast_(torch.tensor([int(Op.STOP)], dtype=torch.int64))
        self._stopped = True
        return True


def follow(comm: Comm, trainer, save: Callable[[], object]) -> int:
    """Serve rank 0's ops until STOP; returns the number of PPO steps taken."""
    steps = 0
    while True:
        op = Op(int(comm.broadcast_(torch.zeros(1, dtype=torch.int64)).item()))
        if op is Op.STEP:
            _run_step(trainer, comm, None)
            steps += 1
        elif op is Op.WEIGHTS:
            for _ in trainer.policy_weights():
                pass
        elif op is Op.SAVE:
            save()
        elif op is Op.SCORE:
            _run_score(trainer, comm, None)
        else:
            return steps
