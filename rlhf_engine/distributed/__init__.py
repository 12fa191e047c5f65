"""The trainer on N ranks: torchrun process groups, collectives, FSDP2 / replicated models, DCP checkpoints.

Rank 0 owns the sockets and the data; each step's batch reaches the other ranks through
`broadcast_samples`; `Comm` carries every whole-batch statistic and control-flow decision, and is a
no-op for a single process, so the same trainer code runs at any world size.
"""

from rlhf_engine.distributed.batch import broadcast_samples
from rlhf_engine.distributed.comm import Comm
from rlhf_engine.distributed.config import DistributedConfig, check_divisible
from rlhf_engine.distributed.group import (
    RankInfo,
    destroy_process_group,
    init_process_group,
    launched_by_torchrun,
    rank_info_from_env,
)
from rlhf_engine.distributed.shard import clip_grad_norm, is_sharded, reduce_gradients, shard_model
from rlhf_engine.distributed.weights import full_tensor, iter_full_state

__all__ = [
    "Comm",
    "DistributedConfig",
    "RankInfo",
    "broadcast_samples",
    "check_divisible",
    "clip_grad_norm",
    "destroy_process_group",
    "full_tensor",
    "init_process_group",
    "is_sharded",
    "iter_full_state",
    "launched_by_torchrun",
    "rank_info_from_env",
    "reduce_gradients",
    "shard_model",
]
