"""A PPO run as N trainer ranks (started by `rlhf-engine ppo --nproc N` or by torchrun directly).

Rank 0 runs the `RLHFEngine` (generators, sockets, prompts, logs, checkpoints' bookkeeping) as a single
trainer would; every other rank builds the same trainer and follows rank 0's ops (`driver.follow`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf_engine.distributed.comm import Comm
from rlhf_engine.distributed.config import check_divisible, check_mixed_precision
from rlhf_engine.distributed.group import (
    destroy_process_group,
    init_process_group,
    rank_info_from_env,
    resolve_backend,
    resolve_device,
)
from rlhf_engine.engine.ranks.failure import FailureChannel

log = logging.getLogger(__name__)


def preflight(config, world_size: int | None = None) -> None:
    """Checks made before any rank starts or joins, so a bad setting fails at once and not at a timeout:
    torchrun's variables are complete (when `world_size` is None: read them), the batch splits over the
    world size, mixed precision has the device it needs."""
    if world_size is None:
        world_size = rank_info_from_env().world_size
    if world_size < 1:
        raise ValueError(f"--nproc ({world_size}) must be >= 1")
    if world_size > 1 and config.model.lora is not None:
        raise ValueError(f"model.lora: LoRA policies train on one trainer rank, not {world_size}")
    check_divisible(world_size, config.ppo.batch_size, config.ppo.mini_batch_size)
    device = resolve_device(config.trainer)
    resolve_backend(config.trainer.backend, device.type)
    check_mixed_precision(config.trainer, device.type)


def run_ppo_ranks(config, resume: str | Path | None) -> dict[str, Any] | None:
    """Join the job, run this rank's part; returns rank 0's run summary (None on the other ranks).

    A failure on any rank ends every rank (`distributed.failure`): the failing rank raises its error, rank 0
    raises `RankFailed` naming the failing rank when it is another, and the other ranks return None.
    """
    from rlhf_engine.engine.build_trainer import build_ppo_trainer
    from rlhf_engine.engine.core import RLHFEngine
    from rlhf_engine.engine.driver import follow
    from rlhf_engine.trainer.ppo.checkpoint import load_trainer, save_trainer

    info, device = init_process_group(config.trainer)
    comm = Comm.from_process_group(device)
    channel = FailureChannel.connect(info, config.trainer.timeout_s)
    try:
        if comm.is_main:
            engine = RLHFEngine(config, resume=resume, comm=comm)
            channel.watch(on_stuck=engine.abandon, exit_code=1)
            return _lead(engine, channel)
        channel.watch(exit_code=0)  # a rank stopped by another's failure did not fail
        ckpt = comm.broadcast_str(None)
        trainer, _ = build_ppo_trainer(config, Path(ckpt) if ckpt else None, comm)
        if ckpt:
            load_trainer(Path(ckpt), trainer)  # models, optimizer, scheduler, KL controller, version, RNGs
        follow(comm, trainer, lambda: save_trainer(comm, None, trainer, {}))
        return None
    except BaseException as e:
        cause = channel.report(e)  # None: this rank's own failure, now reported to the others
        if cause is None:
            raise
        if comm.is_main:
            raise cause from e
        log.error("trainer rank %d stopped: %s", comm.rank, cause)
        return None
    finally:
        channel.close()
        destroy_process_group()


def _lead(engine, channel: FailureChannel) -> dict[str, Any]:
    """Rank 0's run; a failure is reported before the generators are stopped, so the other ranks end meanwhile."""
    engine.start()
    try:
        for _ in engine.steps():
            pass
        return engine.summary()
    except BaseException as e:
        channel.report(e)
        raise
    finally:
        engine.stop()
