"""PPO runs shared by the 1-rank (in the test process) and 2-rank (torchrun) sides of the equivalence tests.

Every run feeds fixed token batches: rank 0 holds them and the real broadcast path hands them to the
other ranks, then every rank calls `PPOTrainer.step`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_engine.common.checkpoint import rng_state, set_rng_state
from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed import Comm, DistributedConfig, broadcast_samples
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo import checkpoint as dcp
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

VOCAB = 300
B = 8
STEPS = 3
SCENARIOS = {
    # name: PPOConfig overrides
    "gae": dict(advantage_estimator="gae"),
    "grpo": dict(advantage_estimator="grpo", num_generations=2),
    "target_kl": dict(advantage_estimator="gae", target_kl=2e-4, ppo_epochs=4),
    "rloo": dict(advantage_estimator="rloo", num_generations=2),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", whiten_rewards=True),
    # micro-batches of at most 16 tokens (samples hold 3..14): a varying count per rank, equalized
    "budget": dict(advantage_estimator="gae", max_tokens_per_microbatch=16),
    # log-probs from the hidden states inside the FSDP2-sharded model's forward (the LM head gathered there)
    "gae_hidden": dict(advantage_estimator="gae", logprobs_from_hidden=True),
    # the passes under bf16 autocast inside the FSDP2-sharded models' forwards
    "gae_bf16": dict(advantage_estimator="gae", bf16=True),
}
GROUPED = ("grpo", "rloo")


def make_trainer(comm: Comm, scenario: str, fsdp: bool = True) -> PPOTrainer:
    kwargs = dict(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2,
                  learning_rate=1e-4, response_length=8, init_kl_coef=0.1)
    cfg = PPOConfig(**{**kwargs, **SCENARIOS[scenario]})
    tokenizer = build_tokenizer(VOCAB)
    spec = TinyLlamaSpec(vocab_size=VOCAB, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
    lm = build_llama(spec, tokenizer, seed=0)
    model = AutoModelForCausalLMWithValueHead(lm) if cfg.uses_critic else lm
    return PPOTrainer(config=cfg, model=model, tokenizer=tokenizer, comm=comm,
                      parallel=DistributedConfig(backend="gloo", fsdp=fsdp))


def step_batch(step: int, scenario: str, eos: int) -> SampleBatch:
    """Fixed samples of one step; grpo's and rloo's come as groups of 2 consecutive samples with one prompt."""
    g = torch.Generator().manual_seed(1000 + step)
    queries, responses = [], []
    for i in range(B):
        if scenario in GROUPED and i % 2 == 1:
            queries.append(queries[-1].clone())
        else:
            queries.append(torch.randint(4, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g))
        r = torch.randint(4, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        if i % 3 == 0:
            r[-1] = eos
        responses.append(r)
    scores = torch.randn(B, generator=g)
    return SampleBatch(queries, responses, scores=scores)


def run_steps(comm: Comm, trainer: PPOTrainer, scenario: str, steps: range,
              save_after: int | None = None, save_dir: Path | None = None) -> list[dict[str, float]]:
    """PPO steps `steps` (indices into the fixed batches); optionally a sharded checkpoint after step
    `save_after` (1-based count of steps done)."""
    history = []
    for step in steps:
        mine = step_batch(step, scenario, trainer.eos_token_ids[0]) if comm.is_main else None
        batch = broadcast_samples(comm, mine)
        history.append(trainer.step_batch(batch))
        if save_after is not None and step + 1 == save_after:
            save_trainer(comm, trainer, save_dir)
    return history


def save_trainer(comm: Comm, trainer: PPOTrainer, path: Path) -> None:
    dcp.save_trainer(comm, path, trainer, {"rng": rng_state()})


def load_trainer(trainer: PPOTrainer, path: Path) -> None:
    set_rng_state(dcp.load_trainer(path, trainer)["rng"])


def full_weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    from rlhf_engine.distributed import iter_full_state

    return {k: v.detach().clone().contiguous() for k, v in iter_full_state(trainer.model)}


def write_result(out: Path, name: str, trainer: PPOTrainer, history: list[dict[str, float]], comm: Comm) -> None:
    weights = full_weights(trainer)  # a collective: every rank gathers
    if comm.is_main:
        save_file(weights, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(history))


def read_result(out: Path, name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    return load_file(str(out / f"{name}.safetensors")), json.loads((out / f"{name}.json").read_text())
