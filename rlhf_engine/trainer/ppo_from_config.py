"""The PPO trainer of an engine run, built from its `RunConfig` (every trainer rank builds it the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_engine.distributed import Comm
from rlhf_engine.models.loading import load_causal_lm
from rlhf_engine.models.reward_scoring import load_reward_model
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo import PPOTrainer

if TYPE_CHECKING:
    from rlhf_engine.config import RunConfig


def build_ppo_trainer(config: RunConfig, ckpt: Path | None, comm: Comm) -> tuple[PPOTrainer, Any]:
    """The PPO trainer of a run (every trainer rank builds it the same way); returns (trainer, tokenizer).
    The policy (and critic) start from the checkpoint's HF folders when resuming; the reference is always the
    initial policy."""
    from transformers import AutoTokenizer

    from rlhf_engine.config import import_function

    m = config.model
    tokenizer = AutoTokenizer.from_pretrained(m.policy)
    policy_dir = ckpt / "policy" if ckpt is not None else Path(m.policy)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    ref = load_causal_lm(m.ref_model or m.policy, frozen=True)
    value_model = None
    if m.value_model is not None:
        critic_dir = ckpt / "policy" / "critic" if ckpt is not None else Path(m.value_model)
        value_model = AutoModelForCausalLMWithValueHead.from_pretrained(critic_dir)
    reward_model = load_reward_model(m.reward_model) if m.reward_model is not None else None
    reward_fn = import_function(m.reward_fn) if m.reward_fn is not None else None
    trainer = PPOTrainer(config=config.ppo, model=policy, ref_model=ref, tokenizer=tokenizer,
                         reward_model=reward_model, reward_fn=reward_fn, value_model=value_model,
                         comm=comm, parallel=config.trainer)
    return trainer, tokenizer
