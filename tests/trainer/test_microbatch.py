"""Token-budget micro-batches: the plan, its bad input, and an update that does not depend on the budget."""

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.passes.microbatch import plan_microbatches, split_to_count
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

B = 8


def test_plan_by_rows_when_budget_off():
    assert plan_microbatches([5, 9, 3, 4, 8], 0, 2) == [[0, 1], [2, 3], [4]]


def test_plan_by_budget_is_greedy_and_ignores_rows():
    # 5 + 9 = 14 > 12: close [0]; 9 + 3 = 12 fits; + 4 = 16 closes; 4 + 8 = 12 fits
    assert plan_microbatches([5, 9, 3, 4, 8], 12, 1) == [[0], [1, 2], [3, 4]]
    assert plan_microbatches([5, 9, 3, 4, 8], 100, 1) == [[0, 1, 2, 3, 4]]


def test_sample_longer_than_budget_names_both_numbers():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens .*max_tokens_per_microbatch is 8"):
        plan_microbatches([5, 9, 3], 8, 1)


def test_config_rejects_negative_budget():
    with pytest.raises(ValueError, match=r"max_tokens_per_microbatch \(-1\) must be an integer >= 0"):
        PPOConfig(max_tokens_per_microbatch=-1)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
@pytest.mark.parametrize("packing", [True, False])
def test_update_does_not_depend_on_the_budget(make_lm, tokenizer, random_pairs, estimator, packing):
    queries, responses = random_pairs(B, seed=5, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))
    queries = [queries[i - i % 2] for i in range(B)]  # groups of 2 for grpo
    longest = max(len(q) + len(r) for q, r in zip(queries, responses))
    results = {}
    # 0: one micro-batch of all 8 rows; the budgets cut the same optimizer step into 2..8 micro-batches
    for budget in (0, 40, longest):
        cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=2, learning_rate=1e-3,
                        advantage_estimator=estimator, num_generations=2, max_tokens_per_microbatch=budget,
                        packing=packing)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        # SGD: Adam's g / sqrt(v) would blow rounding noise in near-zero gradients up to +-lr
        trainer = PPOTrainer(cfg, model, tokenizer=tokenizer, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        stats = trainer.step(queries, responses, torch.linspace(-1, 1, B))
        results[budget] = (stats, {k: v.clone() for k, v in model.state_dict().items()})
    stats0, w0 = results[0]
    for budget in (40, longest):
        stats, w = results[budget]
        assert stats["ppo/grad_norm"] == pytest.approx(stats0["ppo/grad_norm"], rel=1e-4)
        for name in w0:  # fp32: the sums over micro-batches only reorder additions
            torch.testing.assert_close(w[name], w0[name], atol=1e-5, rtol=1e-4, msg=f"budget {budget}: {name}")


def test_step_with_a_sample_over_the_budget_raises(make_lm, tokenizer):
    cfg = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, max_tokens_per_microbatch=6)
    trainer = PPOTrainer(cfg, AutoModelForCausalLMWithValueHead(make_lm()), tokenizer=tokenizer)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7])]
    responses = [torch.tensor([8, 9]), torch.tensor([8, 9, 10, 11])]
    with pytest.raises(ValueError, match="sample 1 has 7 tokens .*max_tokens_per_microbatch is 6"):
        trainer.step(queries, responses, [0.0, 1.0])


def test_split_to_count_halves_the_largest():
    assert split_to_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_to_count([[0, 1, 2], [3]], 2) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="cannot cut 2 samples into 3 micro-batches"):
        split_to_count([[0], [1]], 3)
