"""`ppo.kl_in_reward: false`: the KL penalty as a loss term beta * mean KL (GRPO's), not in the rewards; on-policy
data then needs no separate policy forward in the experience."""

import pytest
import torch

from rlhf_engine.ops import token_kl
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

B, BETA = 8, 0.3


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_kl_loss_term_value_and_no_policy_pass(make_lm, tokenizer, random_pairs):
    queries, responses = random_pairs(B, seed=7, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]  # groups of 2 equal prompts
    policy, ref = make_lm(seed=0), make_lm(seed=1)  # different weights: KL > 0
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=1, advantage_estimator="grpo", num_generations=2,
                    kl_in_reward=False, kl_penalty="k3", init_kl_coef=BETA, adap_kl_ctrl=False, learning_rate=1e-3)
    trainer = PPOTrainer(cfg, policy, ref_model=ref, tokenizer=tokenizer,
                         optimizer=torch.optim.SGD(policy.parameters(), lr=0.0))
    policy_calls, ref_calls = _count_forwards(policy), _count_forwards(ref)
    stats = trainer.step(queries, responses, torch.linspace(-1, 1, B))
    assert policy_calls[0] == 1 and ref_calls[0] == 1  # the update's forward only; one reference pass

    # expected: the k3 estimate of KL(pi || ref) per token, averaged over the batch's response tokens
    batch = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        logp = forward_policy(policy, batch, 1.0).logp
        ref_logp = forward_policy(ref, batch, 1.0).logp
    mask = batch.response_mask
    expected_kl = float((token_kl(logp, ref_logp, kind="k3", mask=mask) * mask).sum() / mask.sum())
    assert expected_kl > 0.01
    assert stats["ppo/loss/kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + BETA * expected_kl, rel=1e-4)
    assert stats["ppo/mean_non_score_reward"] == 0.0  # the rewards are the scores alone
    # the reported KL is still the one of the samples (summed per sequence, averaged over the batch)
    assert stats["objective/kl"] == pytest.approx(float((token_kl(logp, ref_logp, kind="k3", mask=mask)
                                                         * mask).sum(dim=1).mean()), rel=1e-4)


def test_kl_loss_gradient_pulls_policy_towards_reference(make_lm, tokenizer, random_pairs):
    # zero scores: GRPO advantages are 0, so the only gradient is beta * grad KL; a step along it lowers the KL
    queries, responses = random_pairs(B, seed=8, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]
    policy, ref = make_lm(seed=0), make_lm(seed=1)
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=1, advantage_estimator="grpo", num_generations=2,
                    kl_in_reward=False, kl_penalty="k3", init_kl_coef=BETA, adap_kl_ctrl=False, learning_rate=1e-3)
    trainer = PPOTrainer(cfg, policy, ref_model=ref, tokenizer=tokenizer,
                         optimizer=torch.optim.SGD(policy.parameters(), lr=0.5))
    first = trainer.step(queries, responses, torch.zeros(B))
    assert first["ppo/loss/policy"] == 0.0 and first["ppo/loss/kl"] > 0
    second = trainer.step(queries, responses, torch.zeros(B))
    assert second["ppo/loss/kl"] < 0.9 * first["ppo/loss/kl"]


def test_kl_in_loss_refuses_estimators_without_the_kl_gradient():
    for kind in ("kl", "abs"):
        with pytest.raises(ValueError, match=f"kl_in_reward=False needs kl_penalty 'k3' or 'mse', got '{kind}'"):
            PPOConfig(kl_in_reward=False, kl_penalty=kind)
    PPOConfig(kl_in_reward=False, kl_penalty="mse")  # accepted
