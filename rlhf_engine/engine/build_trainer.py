"""The PPO trainer of an engine run, built from its `RunConfig` (every trainer rank builds it the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_engine.distributed import Comm
from rlhf_engine.distributed.group import resolve_device
from rlhf_engine.models.loading import is_adapter_folder, load_causal_lm, load_lora_model
from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.models.reward_scoring import load_reward_model
from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo.checkpoint import CRITIC_DIR, POLICY_DIR
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

if TYPE_CHECKING:
    from rlhf_engine.engine.config import RunConfig


def build_ppo_trainer(config: RunConfig, ckpt: Path | None, comm: Comm) -> tuple[PPOTrainer, Any]:
    """The PPO trainer of a run (every trainer rank builds it the same way); returns (trainer, tokenizer).
    The policy (and critic) start from the checkpoint's folders when resuming; the reference is always the
    initial policy (with `model.lora` and no `model.ref_model`: the policy's base with adapters disabled).
    The models go to `trainer.device`."""
    from transformers import AutoTokenizer

    from rlhf_engine.engine.config import import_function

    m = config.model
    tokenizer = AutoTokenizer.from_pretrained(m.policy)
    saved = ckpt / POLICY_DIR if ckpt is not None else None
    policy = _load_trainable(m.policy, saved, m.lora, config.ppo.seed,
                             value_head_file=ckpt / VALUE_HEAD_FILE if ckpt is not None else None)
    ref = load_causal_lm(m.ref_model, frozen=True) if m.ref_model is not None else None
    if ref is None and m.lora is None:
        ref = load_causal_lm(m.policy, frozen=True)
    value_model = None
    if m.value_model is not None:
        critic_lora = m.lora if m.lora is not None and m.lora.critic else None
        value_model = _load_trainable(m.value_model, ckpt / CRITIC_DIR if ckpt is not None else None, critic_lora,
                                      config.ppo.seed + 1)
    reward_model = load_reward_model(m.reward_model) if m.reward_model is not None else None
    reward_fn = import_function(m.reward_fn) if m.reward_fn is not None else None
    # `trainer.device`: every rank's models on its device (a rank's is cuda:LOCAL_RANK, set when it joined)
    device = comm.device if comm.distributed else resolve_device(config.trainer)
    for model in (policy, ref, value_model, reward_model):
        if model is not None:
            model.to(device)
    trainer = PPOTrainer(config=config.ppo, model=policy, ref_model=ref, tokenizer=tokenizer,
                         reward_model=reward_model, reward_fn=reward_fn, value_model=value_model,
                         comm=comm, parallel=config.trainer)
    return trainer, tokenizer


def _load_trainable(path: str, saved: Path | None, lora: LoraConfig | None, seed: int,
                    value_head_file: Path | None = None) -> AutoModelForCausalLMWithValueHead:
    """A trainable model with a value head: from the HF folder `path`, or from a checkpoint's folder `saved`
    (full weights, or with `lora` the adapters on `path` as the frozen base; fresh adapters drawn from
    `seed`, so that every run of a config starts from the same ones). The head comes from `value_head_file`
    when given (a checkpoint's policy head, beside its folder), else from the folder's own
    `value_head.safetensors` (a critic's), else starts at zero."""
    if lora is not None:
        return load_lora_model(path, lora, saved, seed=seed, value_head_file=value_head_file)
    if saved is not None and is_adapter_folder(saved):
        raise ValueError(f"{saved} holds LoRA adapters but model.lora is not set: set the run's model.lora to "
                         "resume it")
    return AutoModelForCausalLMWithValueHead.from_pretrained(saved if saved is not None else Path(path),
                                                             value_head_file=value_head_file)
