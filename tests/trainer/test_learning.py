"""Learning test: PPO (GAE, value head, KL penalty) makes a tiny random policy prefer a rewarded token set.

Reward = fraction of response tokens whose id lies in TARGET (30 of 300 ids, so ~0.1 for the random
initial policy). Over 30 steps of 32 samples the mean reward must rise clearly while the KL to the
reference (summed over a 12-token response) stays bounded by the KL penalty.
"""

import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo import PPOTrainer
from rlhf_engine.trainer.ppo_config import PPOConfig

TARGET = range(10, 40)
STEPS = 30


def rule_reward(responses: list[torch.Tensor]) -> list[float]:
    return [float(((r >= TARGET.start) & (r < TARGET.stop)).float().mean()) for r in responses]


def test_ppo_learns_rule_based_reward(make_lm, tokenizer):
    config = PPOConfig(
        batch_size=32, mini_batch_size=16, ppo_epochs=2, learning_rate=2e-3, response_length=12,
        init_kl_coef=0.02, adap_kl_ctrl=False, vf_coef=0.5, cliprange_value=10.0, seed=0,
    )
    trainer = PPOTrainer(config=config, model=AutoModelForCausalLMWithValueHead(make_lm(seed=0)), tokenizer=tokenizer)
    prompts = [torch.tensor(tokenizer(s)["input_ids"][:5]) for s in ("the cat likes", "a dog sees", "my friend", "our teacher")]
    rewards, kls = [], []
    for step in range(STEPS):
        queries = [prompts[i % len(prompts)] for i in range(config.batch_size)]
        responses = trainer.generate(queries)
        stats = trainer.step(queries, responses, rule_reward(responses))
        rewards.append(stats["env/reward_mean"])
        kls.append(stats["objective/kl"])
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"reward first 5 steps {before:.3f}, last 5 steps {after:.3f}; KL max {max(kls):.2f}, last {kls[-1]:.2f}")
    assert before < 0.2  # ~ 30 / 300 for the random policy
    assert after > before + 0.25, (before, after)
    # bounded: far below the KL of a policy that puts all mass on the target set (12 * ln(300 / 30) = 27.6)
    assert max(kls) < 20.0, kls
