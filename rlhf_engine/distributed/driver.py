"""Rank 0 leads, the other ranks follow: every collective the engine needs, announced by an op code.

Rank 0 runs the engine (sockets, data, logs) and calls `Leader` methods at each point where all ranks must
join in; `follow` is the whole life of every other rank: wait for the next op code (a broadcast int64),
then take part in that collective. The run ends when rank 0 sends STOP (on success, error or interrupt);
a rank that dies makes torchrun stop the others.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlhf_engine.distributed.batch import StepBatch, broadcast_step_batch
from rlhf_engine.distributed.comm import Comm


class Op(enum.IntEnum):
    STEP = 1  # a PPO step on the broadcast batch
    WEIGHTS = 2  # gather the full policy weights (rank 0 publishes them)
    SAVE = 3  # write a sharded checkpoint
    STOP = 4  # leave


def _run_step(trainer, comm: Comm, batch: StepBatch | None) -> dict[str, float]:
    batch = broadcast_step_batch(comm, batch)
    return trainer.step(batch.queries, batch.responses, batch.scores,
                        behaviour_logprobs=batch.behaviour_logprobs, policy_versions=batch.policy_versions)


class Leader:
    """Rank 0's side. With one rank every method is the plain local call."""

    def __init__(self, comm: Comm, trainer, save: Callable[..., Path]) -> None:
        if not comm.is_main:
            raise ValueError(f"Leader runs on rank 0, not rank {comm.rank}")
        self.comm = comm
        self.trainer = trainer
        self._save = save
        self._stopped = False

    def _announce(self, op: Op) -> None:
        self.comm.broadcast_(torch.tensor([int(op)], dtype=torch.int64))

    def step(self, batch: StepBatch) -> dict[str, float]:
        self._announce(Op.STEP)
        return _run_step(self.trainer, self.comm, batch)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full policy weights, one tensor at a time (the other ranks gather alongside)."""
        self._announce(Op.WEIGHTS)
        return self.trainer.policy_weights()

    def save(self, *args) -> Path:
        """Write a sharded checkpoint: `save(*args)` here, the followers' own `save()` alongside."""
        self._announce(Op.SAVE)
        return self._save(*args)

    def stop(self) -> None:
        """Release the other ranks (idempotent)."""
        if not self._stopped and self.comm.distributed:
            self._announce(Op.STOP)
        self._stopped = True


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
        else:
            return steps
