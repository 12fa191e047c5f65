"""rlhf_engine: an asynchronous RLHF engine (SFT, reward modelling, PPO, DPO) with fused kernels.

The public names below are imported lazily, so `import rlhf_engine` stays cheap and a process
that only needs the transport never loads transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PPOConfig": "rlhf_engine.trainer.ppo.config",
    "PPOTrainer": "rlhf_engine.trainer.ppo.trainer",
    "AutoModelForCausalLMWithValueHead": "rlhf_engine.models.value_head",
    "SFTConfig": "rlhf_engine.trainer.stages.sft_config",
    "SFTTrainer": "rlhf_engine.trainer.stages.sft",
    "RewardConfig": "rlhf_engine.trainer.stages.reward_config",
    "RewardTrainer": "rlhf_engine.trainer.stages.reward",
    "DPOConfig": "rlhf_engine.trainer.stages.dpo_config",
    "DPOTrainer": "rlhf_engine.trainer.stages.dpo",
    "RLHFEngine": "rlhf_engine.engine.core",
    "Callback": "rlhf_engine.engine.core",
    "RunConfig": "rlhf_engine.engine.config",
    "load_run_config": "rlhf_engine.engine.config",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from rlhf_engine.engine.config import RunConfig, load_run_config
    from rlhf_engine.engine.core import Callback, RLHFEngine
    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
    from rlhf_engine.trainer.ppo.config import PPOConfig
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer
    from rlhf_engine.trainer.stages.dpo import DPOTrainer
    from rlhf_engine.trainer.stages.dpo_config import DPOConfig
    from rlhf_engine.trainer.stages.reward import RewardTrainer
    from rlhf_engine.trainer.stages.reward_config import RewardConfig
    from rlhf_engine.trainer.stages.sft import SFTTrainer
    from rlhf_engine.trainer.stages.sft_config import SFTConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
