"""PPO loss pieces against hand-computed tiny cases (arithmetic in the comments)."""

import math

import pytest
import torch

from rlhf_engine.trainer.losses import entropy_bonus, ppo_policy_loss, truncated_importance_weights, value_loss


def test_policy_loss_hand_computed():
    # three tokens, the third masked out; cliprange 0.2
    # token 0: ratio = e^{ln 1.5} = 1.5, A = +1 -> max(-1.5, -1.2) = -1.2   (clipped term chosen)
    # token 1: ratio = 0.5, A = -2        -> max(+1.0, +1.6) = +1.6          (clipped term chosen)
    # loss = mean(-1.2, 1.6) = 0.2 ; clipfrac = 2/2 = 1
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 5.0]])
    adv = torch.tensor([[1.0, -2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    # approxkl = 0.5 * mean(ln(1.5)^2, ln(0.5)^2) = 0.5 * (0.164402 + 0.480453) / 2 = 0.161214
    assert stats["approxkl"].item() == pytest.approx(0.161214, abs=1e-5)
    # k3 = mean((r - 1) - ln r) = mean(0.5 - 0.405465, -0.5 + 0.693147) = (0.094535 + 0.193147) / 2 = 0.143841
    assert stats["approxkl_k3"].item() == pytest.approx(0.143841, abs=1e-5)


def test_policy_loss_inside_clip_range_is_plain_surrogate():
    # ratio 1.1 and 0.9 lie inside [0.8, 1.2]: loss = mean(-2 * 1.1, -(-1) * 0.9) = mean(-2.2, 0.9) = -0.65
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.1, 0.9]]))
    adv = torch.tensor([[2.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 2), cliprange=0.2)
    assert loss.item() == pytest.approx(-0.65, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_gradient_zero_when_clipped():
    # ratio 1.5 with A > 0 is clipped at 1.2: the loss is flat in logp there
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    # token 1: ratio 1 inside the range, d/dlogp (-A * e^logp) / 2 = -1 * 1 / 2 = -0.5
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])


def test_policy_loss_importance_weights_scale_tokens():
    # ratio 1 everywhere: per-token loss = -A = (-1, -3); weights (2, 0.5) -> mean(-2, -1.5) = -1.75
    loss, _ = ppo_policy_loss(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), 0.2,
        is_weights=torch.tensor([[2.0, 0.5]]),
    )
    assert loss.item() == pytest.approx(-1.75)


def test_value_loss_hand_computed():
    # cliprange_value 0.5; old values 0; returns 1
    # token 0: V = 2.0 -> V_clip = 0.5; (2-1)^2 = 1, (0.5-1)^2 = 0.25 -> max 1     (unclipped larger)
    # token 1: V = -1 -> V_clip = -0.5; (-1-1)^2 = 4, (-0.5-1)^2 = 2.25 -> max 4   (unclipped larger)
    # token 2: V = 0.9 -> V_clip = 0.5; 0.01 vs 0.25 -> max 0.25                   (clipped larger)
    # loss = 0.5 * mean(1, 4, 0.25) = 0.5 * 1.75 = 0.875 ; clipfrac = 1/3 ; error = mean(1, 4, 0.01) = 1.67
    values = torch.tensor([[2.0, -1.0, 0.9]])
    loss, stats = value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), cliprange_value=0.5)
    assert loss.item() == pytest.approx(0.875, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["error"].item() == pytest.approx(5.01 / 3, abs=1e-6)


def test_value_loss_ignores_masked_tokens():
    values = torch.tensor([[1.0, 100.0]])
    loss, _ = value_loss(values, values, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 0.2)
    # only token 0: 0.5 * (1 - 0)^2 = 0.5
    assert loss.item() == pytest.approx(0.5)


def test_truncated_importance_weights():
    # w = min(exp(old - behaviour), 2): exp(0) = 1, exp(ln 1.5) = 1.5, exp(ln 3) = 3 -> 2, exp(ln 0.25) = 0.25
    old = torch.log(torch.tensor([[1.0, 1.5, 3.0, 0.25]]))
    w = truncated_importance_weights(old, torch.zeros(1, 4), cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 1.5, 2.0, 0.25])
    assert not w.requires_grad


def test_entropy_bonus_is_masked_mean():
    # mean(1, 3) = 2 (the third token is padding)
    assert entropy_bonus(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])).item() == 2.0
