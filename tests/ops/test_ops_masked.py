"""masked_mean / masked_var / masked_whiten on hand-computed tensors."""

import pytest
import torch

from rlhf_engine.ops import masked_mean, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 6.0]])
M = torch.tensor([[True, True, False], [True, False, True]])  # selects 1, 2, 3, 6


def test_masked_mean_all_and_per_dim():
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(3.0))  # (1 + 2 + 3 + 6) / 4
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.5]))


def test_masked_var_unbiased_and_biased():
    # deviations from 3: -2, -1, 0, 3 -> squares sum 14; biased 14 / 4 = 3.5, unbiased 14 / 3
    torch.testing.assert_close(masked_var(X, M), torch.tensor(14 / 3))
    torch.testing.assert_close(masked_var(X, M, unbiased=False), torch.tensor(3.5))


def test_masked_whiten_selected_positions():
    w = masked_whiten(X, M)
    sel = w[M]
    torch.testing.assert_close(sel.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(sel.var(), torch.tensor(1.0), atol=1e-6, rtol=1e-6)
    kept = masked_whiten(X, M, shift_mean=False)[M]
    torch.testing.assert_close(kept.mean(), torch.tensor(3.0))  # the mean is added back


def test_errors():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(X, M[0])
    with pytest.raises(ValueError, match="selects 1"):
        masked_var(X, torch.zeros_like(M).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(True)))
    with pytest.raises(TypeError, match="floating"):
        masked_mean(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
