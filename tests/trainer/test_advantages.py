"""Advantage estimators against hand-computed values."""

import pytest
import torch

from rlhf_engine.trainer.advantages import (
    broadcast_to_tokens,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_returns,
)


def test_gae_returns_hand_computed_and_advantages_whitened():
    # one row, T = 3 (last padding), gamma = 1, lam = 0.5, rewards (0, 1), values (0.5, 0.25)
    # delta_1 = 1 + 0 - 0.25 = 0.75 ; A_1 = 0.75
    # delta_0 = 0 + 0.25 - 0.5 = -0.25 ; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    # returns = A + V = (0.625, 1.0)
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert returns[0, :2].tolist() == pytest.approx([0.625, 1.0])
    # whitened over the 2 valid tokens: mean 0.4375, the two values sit symmetric around it
    assert advantages[0, 0].item() < 0 < advantages[0, 1].item()
    assert advantages[0, 0].item() == pytest.approx(-advantages[0, 1].item(), abs=1e-5)
    assert advantages[0, 2].item() == 0.0


def test_gae_on_packed_valid_tokens_equals_padded_scan():
    # responses of 8..128 tokens (and one fully masked sample): the packed scan over the valid tokens gives
    # the padded kernel's advantages and returns at every valid position and 0 on padding
    from rlhf_engine.ops import gae
    from rlhf_engine.trainer.advantages import gae_on_valid_tokens

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8, 128, 37, 0, 64, 99])
    mask = torch.arange(128)[None, :] < lengths[:, None]  # [6, 128]
    rewards = torch.randn(6, 128, generator=g)
    values = torch.randn(6, 128, generator=g)
    adv, ret = gae_on_valid_tokens(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, ref_adv * mask, rtol=0, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret * mask, rtol=0, atol=1e-5)
    assert adv[~mask].abs().max() == 0 and ret[3].abs().max() == 0
    # a batch whose samples were all dropped: zeros, no error from the empty scan
    zero_adv, zero_ret = gae_on_valid_tokens(rewards, values, torch.zeros_like(mask), 0.99, 0.95)
    assert zero_adv.abs().max() == 0 and zero_ret.abs().max() == 0


def test_grpo_group_normalised():
    # group 1: (1, 3) -> mean 2, std (Bessel) = sqrt(2) -> (-1/sqrt2, 1/sqrt2) = (-0.70711, 0.70711)
    # group 2: (5, 5) -> std 0 -> (0, 0)
    adv = grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), num_generations=2, eps=0.0)
    assert adv[:2].tolist() == pytest.approx([-0.707107, 0.707107], abs=1e-5)
    assert torch.isnan(adv[2:]).all()  # eps = 0 and a constant group: 0 / 0
    adv = grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), num_generations=2)
    assert adv[2:].tolist() == [0.0, 0.0]


def test_rloo_leave_one_out_baseline():
    # k = 3, returns (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> (-3, -1.5, 4.5)
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), num_generations=3)
    assert adv.tolist() == pytest.approx([-3.0, -1.5, 4.5])


def test_group_estimators_leave_out_invalid_samples():
    # k = 3; group 1 (1, 99, 3) with 99 invalid: GRPO over (1, 3) -> mean 2, std sqrt2 -> (-0.70711, 0, 0.70711);
    # RLOO over (1, 3): baselines 3 and 1 -> (-2, 0, 2); group 2 (4, 7, 8) with only 7 valid: all 0
    returns = torch.tensor([1.0, 99.0, 3.0, 4.0, 7.0, 8.0])
    valid = torch.tensor([True, False, True, False, True, False])
    assert grpo_advantages(returns, 3, eps=0.0, valid=valid).tolist() == pytest.approx(
        [-0.707107, 0.0, 0.707107, 0.0, 0.0, 0.0], abs=1e-5)
    assert rloo_advantages(returns, 3, valid=valid).tolist() == pytest.approx([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    # all valid: the same as without a mask
    every = torch.ones(6, dtype=torch.bool)
    assert torch.equal(grpo_advantages(returns, 3, valid=every), grpo_advantages(returns, 3))
    assert torch.equal(rloo_advantages(returns, 3, valid=every), rloo_advantages(returns, 3))


def test_group_estimators_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.tensor([1.0, 2.0]), num_generations=3)


def test_reinforce_pp_discounted_returns_whitened():
    # gamma = 0.5, rewards (1, 0, 2): G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 2 (2 tokens): G_1 = 4, G_0 = 0 + 0.5 * 4 = 2
    advantages, returns = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert returns[0].tolist() == pytest.approx([1.5, 1.0, 2.0])
    assert returns[1, :2].tolist() == pytest.approx([2.0, 4.0])
    # whitened over the 5 valid tokens (1.5, 1, 2, 2, 4): mean 2.1, unbiased var 1.3 -> (G - 2.1) / 1.140175
    expected = [(g - 2.1) / 1.3**0.5 for g in (1.5, 1.0, 2.0)]
    assert advantages[0].tolist() == pytest.approx(expected, abs=1e-4)
    assert advantages[1, 2].item() == 0.0


def test_sequence_returns_and_broadcast():
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # row 0: -0.1 - 0.2 + 1 = 0.7 ; row 1: 0.5 (padding ignored)
    assert sequence_returns(rewards, mask).tolist() == pytest.approx([0.7, 0.5])
    assert broadcast_to_tokens(torch.tensor([2.0, 3.0]), mask).tolist() == [[2.0, 2.0, 2.0], [3.0, 0.0, 0.0]]


def test_gae_on_valid_tokens_keeps_fp64():
    from rlhf_engine.ops import gae
    from rlhf_engine.trainer.advantages import gae_on_valid_tokens

    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 9.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])  # not a prefix: the scan skips the hole
    adv, ret = gae_on_valid_tokens(rewards, values, mask, 0.9, 0.8)
    ref_adv, ref_ret = gae(rewards, values, mask, 0.9, 0.8)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv * mask, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret * mask, rtol=0, atol=1e-12)
