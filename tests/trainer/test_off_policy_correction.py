"""Off-policy correction of the policy loss: `tis` (weights truncated at the cap) against `decoupled` (AReaL's
decoupled PPO objective: tokens whose weight pi_old / pi_behaviour exceeds the cap dropped), from the weights
to a whole step."""

import math

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.losses import masked_importance_weights, ppo_policy_loss, truncated_importance_weights
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.old_policy import off_policy_weights
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

B = 8


def test_masked_importance_weights_hand_computed():
    # w = exp(old - behaviour) = (1, 1.5, 3, 0.25); cap 2: the 3 is dropped (0), the rest kept exactly
    old = torch.log(torch.tensor([[1.0, 1.5, 3.0, 0.25]]))
    w = masked_importance_weights(old, torch.zeros(1, 4), cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 1.5, 0.0, 0.25])
    assert not w.requires_grad


def test_weight_at_the_cap_is_kept():
    # AReaL keeps w <= cap: w = exp(log 2) = 2 stays (not 0), w = 2.01 goes
    old = torch.log(torch.tensor([[2.0, 2.01]]))
    w = masked_importance_weights(old, torch.zeros(1, 2), cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.0])


def test_below_the_cap_decoupled_weights_are_the_truncated_ones():
    # every log-weight below log 2: min(w, 2) = w and nothing is dropped, so the two are the same tensor
    g = torch.Generator().manual_seed(0)
    log_w = torch.rand(3, 7, generator=g) * (3.0 + math.log(2.0) - 1e-3) - 3.0  # in [-3, log 2)
    old, behaviour = log_w - 1.0, torch.full_like(log_w, -1.0)
    assert torch.equal(masked_importance_weights(old, behaviour, 2.0), truncated_importance_weights(old, behaviour, 2.0))


def test_policy_loss_drops_the_far_token_but_keeps_it_in_the_mean():
    # ratio pi / pi_old = 1 on every token (logp = old_logp = 0), so the per-token loss is -A_t * w_t
    # A = (1, 2, 4); w = pi_old / pi_behaviour = (1, 1.5, 3); cap 2
    # tis:       w = (1, 1.5, 2) -> (-1 - 3 - 8) / 3 = -4
    # decoupled: w = (1, 1.5, 0) -> (-1 - 3 - 0) / 3 = -4/3  (the dropped token counts in the mean: / 3, not / 2)
    old = torch.zeros(1, 3)
    behaviour = -torch.log(torch.tensor([[1.0, 1.5, 3.0]]))
    advantages = torch.tensor([[1.0, 2.0, 4.0]])
    mask = torch.ones(1, 3)
    for weights, expected, grad in (
        (truncated_importance_weights(old, behaviour, 2.0), -4.0, [-1 / 3, -1.0, -8 / 3]),
        # d/dlogp of -A * w * e^logp / 3 at logp = 0: (-1 * 1, -2 * 1.5, -4 * 0) / 3
        (masked_importance_weights(old, behaviour, 2.0), -4 / 3, [-1 / 3, -1.0, 0.0]),
    ):
        logp = torch.zeros(1, 3, requires_grad=True)
        loss, _ = ppo_policy_loss(logp, old, advantages, mask, 0.2, is_weights=weights)
        loss.backward()
        assert loss.item() == pytest.approx(expected)
        assert logp.grad[0].tolist() == pytest.approx(grad)


def test_dropped_tokens_count_in_the_shared_token_count():
    # two micro-batches of one optimizer step, N = 3 tokens: (tokens 0, 1) and (token 2, dropped) sum to the
    # whole -4/3; the dropped token's micro-batch adds 0 and still counts in N
    old = torch.zeros(1, 3)
    behaviour = -torch.log(torch.tensor([[1.0, 1.5, 3.0]]))
    advantages = torch.tensor([[1.0, 2.0, 4.0]])
    w = masked_importance_weights(old, behaviour, 2.0)
    first, _ = ppo_policy_loss(old[:, :2], old[:, :2], advantages[:, :2], torch.ones(1, 2), 0.2, w[:, :2], 3)
    second, _ = ppo_policy_loss(old[:, 2:], old[:, 2:], advantages[:, 2:], torch.ones(1, 1), 0.2, w[:, 2:], 3)
    assert second.item() == 0.0
    assert (first + second).item() == pytest.approx(-4 / 3)


def test_off_policy_weights_follow_the_correction():
    old = torch.log(torch.tensor([[1.0, 3.0, 1.5]]))
    behaviour = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: weight 0 whatever its ratio
    tis = off_policy_weights(PPOConfig(tis_cap=2.0), old, behaviour, mask)
    decoupled = off_policy_weights(PPOConfig(off_policy_correction="decoupled", tis_cap=2.0), old, behaviour, mask)
    assert tis[0].tolist() == pytest.approx([1.0, 2.0, 0.0])
    assert decoupled[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert off_policy_weights(PPOConfig(off_policy_correction="none"), old, behaviour, mask) is None
    assert off_policy_weights(PPOConfig(off_policy_correction="decoupled"), old, None, mask) is None


def test_config_choices():
    assert PPOConfig().off_policy_correction == "tis"  # the default
    assert PPOConfig(off_policy_correction="decoupled", tis_cap=5.0).tis_cap == 5.0
    with pytest.raises(ValueError, match=r"off_policy_correction \('mask'\) must be one of tis, decoupled, none"):
        PPOConfig(off_policy_correction="mask")
    with pytest.raises(ValueError, match=r"tis_cap \(0.9\) must be >= 1"):
        PPOConfig(off_policy_correction="decoupled", tis_cap=0.9)


# --- a whole step ------------------------------------------------------------------------------------------
# two ways to pi_old: the experience's policy pass (GAE with a value head and KL-shaped rewards), and the update's
# own forward (one optimizer step, critic-free, no KL: `old_policy.old_logp_from_update`)
PATHS = {
    "policy_pass": dict(),
    "update_forward": dict(advantage_estimator="grpo", num_generations=2, init_kl_coef=0.0, adap_kl_ctrl=False),
}


def _trainer(make_lm, tokenizer, **overrides):
    kwargs = dict(batch_size=B, mini_batch_size=B, ppo_epochs=1, learning_rate=1e-3, response_length=6, tis_cap=2.0)
    kwargs.update(overrides)
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
    return PPOTrainer(config=PPOConfig(**kwargs), model=model, tokenizer=tokenizer)


@pytest.fixture
def samples(make_lm, tokenizer, random_pairs):
    """(queries, responses cut at EOS, the policy's own log-probs of each response, trained token counts)."""
    queries, responses = random_pairs(B, seed=3, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]  # pairs share a prompt (grpo's groups of 2)
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))  # the trainer's policy before the step
    batch = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        logp = forward_policy(model, batch, 1.0).logp
    lengths = batch.response_mask.sum(dim=1).long().tolist()
    return queries, [r[:n] for r, n in zip(responses, lengths)], [logp[i, :n] for i, n in enumerate(lengths)], lengths


@pytest.mark.parametrize("path", PATHS)
def test_decoupled_step_masks_the_far_tokens(make_lm, tokenizer, samples, path):
    queries, responses, own, lengths = samples
    # rows 0-3: the sampler agrees with the trainer (w = 1); rows 4-7: it found every token e^5 times less likely
    # (w = e^5 > 2): those tokens are dropped, and they are sum(lengths[4:]) / sum(lengths) of the trained tokens
    behaviour = [x if i < 4 else x - 5.0 for i, x in enumerate(own)]
    far = sum(lengths[4:]) / sum(lengths)
    trainer = _trainer(make_lm, tokenizer, off_policy_correction="decoupled", **PATHS[path])
    stats = trainer.step(queries, responses, torch.linspace(-1, 1, B), behaviour_logprobs=behaviour)
    assert 0 < far < 1
    assert stats["off_policy/is_masked_fraction"] == pytest.approx(far)
    assert "off_policy/is_truncated_fraction" not in stats
    # mean weight over the trained tokens: 1 on the near ones, 0 on the dropped ones
    assert stats["off_policy/is_weight_mean"] == pytest.approx(1.0 - far, abs=1e-5)
    assert stats["off_policy/behaviour_kl"] == pytest.approx(5.0 * far, abs=1e-4)
    assert stats["ppo/optimizer_steps"] == 1.0 and math.isfinite(stats["ppo/loss/policy"])


def test_decoupled_step_with_every_token_far_has_no_policy_loss(make_lm, tokenizer, samples):
    queries, responses, own, _ = samples
    far = [x - 5.0 for x in own]  # w = e^5 on every token
    scores = torch.linspace(-1, 1, B)
    decoupled = _trainer(make_lm, tokenizer, off_policy_correction="decoupled").step(
        queries, responses, scores, behaviour_logprobs=far)
    assert decoupled["off_policy/is_masked_fraction"] == 1.0
    assert decoupled["off_policy/is_weight_mean"] == 0.0
    assert decoupled["ppo/loss/policy"] == 0.0  # every weight 0 (the value loss still trains the critic)
    tis = _trainer(make_lm, tokenizer).step(queries, responses, scores, behaviour_logprobs=far)
    assert tis["off_policy/is_truncated_fraction"] == 1.0 and tis["off_policy/is_weight_mean"] == pytest.approx(2.0)
    assert tis["ppo/loss/policy"] != 0.0


@pytest.mark.parametrize("path", PATHS)
def test_decoupled_step_is_the_tis_step_below_the_cap(make_lm, tokenizer, samples, path):
    queries, responses, own, _ = samples
    near = [x - 0.1 for x in own]  # w = e^0.1 = 1.105 < 2 everywhere: nothing truncated, nothing dropped
    results = {}
    for correction in ("tis", "decoupled"):
        trainer = _trainer(make_lm, tokenizer, off_policy_correction=correction, **PATHS[path])
        stats = trainer.step(queries, responses, torch.linspace(-1, 1, B), behaviour_logprobs=near)
        results[correction] = stats, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (tis, tis_weights), (decoupled, decoupled_weights) = results["tis"], results["decoupled"]
    assert tis.pop("off_policy/is_truncated_fraction") == 0.0
    assert decoupled.pop("off_policy/is_masked_fraction") == 0.0
    assert tis["off_policy/is_weight_mean"] == pytest.approx(math.exp(0.1), abs=1e-4)
    for key in tis:
        if not key.startswith("time/"):
            assert decoupled[key] == tis[key], key
    for name, value in tis_weights.items():
        assert torch.equal(decoupled_weights[name], value), name
