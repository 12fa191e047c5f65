"""The samples' loss mask in a PPO step: tokens outside it (environment tokens) change no loss, gradient, KL,
reward, advantage or statistic; a mask of all True is the plain step, bit for bit."""

import pytest
import torch

from rlhf_engine.data.samples import Sample, SampleBatch
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.trainer import PPOTrainer
from tests.trainer.conftest import VOCAB

B = 8
CONFIGS = {
    # KL in the rewards, whitened rewards, entropy bonus, a critic: the experience's own policy pass
    "gae": dict(advantage_estimator="gae", whiten_rewards=True, entropy_coef=0.01, init_kl_coef=0.1),
    # KL as a loss term, no critic, one optimizer step: pi_old from the update's own forward
    "grpo": dict(advantage_estimator="grpo", num_generations=2, init_kl_coef=0.05, kl_in_reward=False, kl_penalty="k3",
                 entropy_coef=0.01),
}


def _trainer(make_lm, tokenizer, name):
    cfg = PPOConfig(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=1, learning_rate=1e-3,
                    **CONFIGS[name])
    lm = make_lm(seed=0)
    model = AutoModelForCausalLMWithValueHead(lm) if cfg.uses_critic else lm
    return PPOTrainer(cfg, model, make_lm(seed=5), tokenizer=tokenizer,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _samples(name, seed=3):
    """B samples whose responses (5..8 tokens, no EOS) end in 2 masked tokens and have one masked token inside;
    grpo's come in groups of 2 with one prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, masks = [], [], []
    for i in range(B):
        if name == "grpo" and i % 2 == 1:
            prompts.append(prompts[-1])
        else:
            prompts.append(torch.randint(4, VOCAB, (int(torch.randint(2, 6, ())),), generator=g))
        r = int(torch.randint(5, 9, (), generator=g))
        responses.append(torch.randint(4, VOCAB, (r,), generator=g))
        mask = torch.ones(r, dtype=torch.bool)
        mask[1] = mask[-2:] = False
        masks.append(mask)
    behaviour = [-torch.rand(len(r), generator=g) for r in responses]
    return prompts, responses, behaviour, masks


def _step(trainer, prompts, responses, behaviour, masks):
    batch = SampleBatch(prompts, responses, behaviour_logp=behaviour, loss_mask=masks,
                        policy_versions=[torch.zeros(len(r), dtype=torch.int64) for r in responses],
                        scores=torch.linspace(-1.0, 1.0, B))
    stats = trainer.step_batch(batch)
    grads_and_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {k: v for k, v in stats.items() if not k.startswith("time/")}, grads_and_weights


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_masked_tokens_change_nothing(make_lm, tokenizer, name):
    prompts, responses, behaviour, masks = _samples(name)
    stats, weights = _step(_trainer(make_lm, tokenizer, name), prompts, responses, behaviour, masks)
    # other ids at the trailing masked tokens (nothing trained comes after them), other sampler log-probs at
    # every masked token
    g = torch.Generator().manual_seed(11)
    changed = [torch.cat([r[:-2], torch.randint(4, VOCAB, (2,), generator=g)]) for r in responses]
    other_behaviour = [torch.where(m, b, -5.0 * torch.rand(len(b), generator=g)) for b, m in zip(behaviour, masks)]
    assert not any(torch.equal(a, b) for a, b in zip(changed, responses))
    stats2, weights2 = _step(_trainer(make_lm, tokenizer, name), prompts, changed, other_behaviour, masks)
    assert stats2 == stats
    for key in weights:  # the updated weights: the same loss gives the same gradients and the same step
        assert torch.equal(weights2[key], weights[key]), key

    # the mask is honoured at all: training every token gives another step
    all_true = [torch.ones_like(m) for m in masks]
    stats3, weights3 = _step(_trainer(make_lm, tokenizer, name), prompts, responses, behaviour, all_true)
    assert stats3["ppo/loss/policy"] != stats["ppo/loss/policy"]
    assert any(not torch.equal(weights3[k], weights[k]) for k in weights)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_mask_of_all_true_is_the_plain_step(make_lm, tokenizer, name):
    prompts, responses, behaviour, masks = _samples(name)
    all_true = [torch.ones_like(m) for m in masks]
    stats, weights = _step(_trainer(make_lm, tokenizer, name), prompts, responses, behaviour, all_true)
    plain = _trainer(make_lm, tokenizer, name)
    plain_stats = plain.step(prompts, responses, torch.linspace(-1.0, 1.0, B), behaviour_logprobs=behaviour,
                             policy_versions=[0] * B)
    assert {k: v for k, v in plain_stats.items() if not k.startswith("time/")} == stats
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_samples_are_checked_where_they_are_made():
    with pytest.raises(ValueError, match="2 loss_mask for 3 response tokens"):
        Sample("s", 0, [1], [4, 5, 6], [-1.0, -1.0, -1.0], 0, "stop", loss_mask=[True, False])
    with pytest.raises(ValueError, match="non-decreasing"):
        Sample("s", 0, [1], [4, 5, 6], [-1.0, -1.0, -1.0], [2, 3, 1], "stop")
    s = Sample("s", 0, [1], [4, 5, 6], [-1.0, 0.0, -1.0], [2, 2, 3], "stop", loss_mask=[True, False, True])
    assert s.policy_version == 2 and s.loss_mask.dtype == torch.bool
    with pytest.raises(ValueError, match=r"loss_mask\[0\] has shape \(2,\)"):
        SampleBatch([torch.tensor([1])], [torch.tensor([4, 5, 6])], loss_mask=[torch.tensor([True, False])])
    with pytest.raises(ValueError, match=r"loss_mask\[0\] must be a 1-D torch.bool tensor"):
        SampleBatch([torch.tensor([1])], [torch.tensor([4, 5, 6])], loss_mask=[torch.tensor([1, 0, 1])])
