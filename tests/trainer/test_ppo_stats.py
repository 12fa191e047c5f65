"""PPO step metrics: explained variance of the critic against hand-computed values."""

import math

import pytest
import torch

from rlhf_engine.trainer.ppo.stats import explained_variance


def test_explained_variance_hand_computed():
    # returns (2, 4, 6), values (1, 4, 5); the fourth token is padding (its 100s must not count)
    # R - V = (1, 0, 1): mean 2/3, Var = 2/3 - 4/9 = 2/9 ; Var[R] = (4 + 0 + 4) / 3 = 8/3
    # EV = 1 - (2/9) / (8/3) = 1 - 1/12 = 0.916667
    returns = torch.tensor([[2.0, 4.0], [6.0, 100.0]])
    values = torch.tensor([[1.0, 4.0], [5.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(11 / 12, abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)  # a perfect critic
    # a constant critic at the mean explains nothing: EV = 1 - Var[R] / Var[R] = 0
    assert explained_variance(torch.full_like(returns, 4.0), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_explained_variance_of_constant_returns_is_nan():
    ones = torch.ones(2, 3)
    assert math.isnan(explained_variance(torch.zeros(2, 3), ones, ones))
