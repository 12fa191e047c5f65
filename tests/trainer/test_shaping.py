"""KL-shaped rewards and the KL estimators (against plain-torch formulas)."""

import pytest
import torch

from rlhf_engine.trainer.ppo.shaping import clip_scores, kl_penalty, kl_shaped_rewards, missing_eos_penalty


def test_kl_shaped_rewards_hand_computed():
    # row 0: 3 valid tokens, KL (1, 2, 3), beta 0.1 -> (-0.1, -0.2, -0.3 + 5) = (-0.1, -0.2, 4.7)
    # row 1: 1 valid token, KL (4, *, *)          -> (-0.4 + (-1), 0, 0) = (-1.4, 0, 0)
    scores = torch.tensor([5.0, -1.0])
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.2, 4.7], [-1.4, 0.0, 0.0]]))
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]))


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_kl_kinds_match_formulas(kind):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g) * 3
    ref = -torch.rand(3, 5, generator=g) * 3
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    d = logp - ref
    expected = {"kl": d, "abs": d.abs(), "mse": 0.5 * d**2, "k3": torch.exp(-d) + d - 1}[kind] * mask
    torch.testing.assert_close(kl_penalty(kind, logp, ref, mask), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_matches_vocabulary_sum(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g)
    ref_logits = torch.randn(2, 4, 11, generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    p = torch.log_softmax(logits / temperature, -1)
    q = torch.log_softmax(ref_logits / temperature, -1)
    expected = (p.exp() * (p - q)).sum(-1) * mask  # KL(pi || ref) per position
    out = kl_penalty("full", None, None, mask, logits, ref_logits, temperature)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_full_kl_needs_logits():
    with pytest.raises(ValueError, match="full"):
        kl_penalty("full", torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))


def test_score_clip_and_missing_eos_penalty():
    scores = torch.tensor([5.0, -7.0, 0.5])
    assert clip_scores(scores, 2.0).tolist() == [2.0, -2.0, 0.5]
    assert clip_scores(scores, None) is scores
    # only the sample without EOS loses 1.0
    out = missing_eos_penalty(scores, torch.tensor([True, False, True]), 1.0)
    assert out.tolist() == [5.0, -8.0, 0.5]
