"""gae / gae_packed vs an independent Python loop (random masks with holes), packed == padded, bad input."""

import pytest
import torch

from rlhf_engine.ops import gae, gae_packed
from rlhf_engine.ops.reference import gae_reference


def python_gae(rewards, values, mask, gamma, lam):
    """Independent scalar loop: compress each row to its valid positions, scan, scatter back."""
    b, t_len = rewards.shape
    adv = torch.zeros(b, t_len, dtype=torch.float64)
    ret = torch.zeros(b, t_len, dtype=torch.float64)
    for i in range(b):
        idx = [t for t in range(t_len) if bool(mask[i, t])]
        next_value, last = 0.0, 0.0
        for t in reversed(idx):
            r, v = float(rewards[i, t]), float(values[i, t])
            last = r + gamma * next_value - v + gamma * lam * last
            adv[i, t], ret[i, t] = last, last + v
            next_value = v
    return adv, ret


def test_hand_computed_two_steps(device):
    # gamma = 0.5, lam = 0.5; r = [1, 2], V = [0.5, 1]
    # t=1: delta = 2 + 0 - 1 = 1, A_1 = 1, R_1 = 2
    # t=0: delta = 1 + 0.5 * 1 - 0.5 = 1, A_0 = 1 + 0.25 * 1 = 1.25, R_0 = 1.75
    r, v = torch.tensor([[1.0, 2.0]], device=device), torch.tensor([[0.5, 1.0]], device=device)
    adv, ret = gae(r, v, torch.ones(1, 2, dtype=torch.bool, device=device), 0.5, 0.5)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[1.25, 1.0]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[1.75, 2.0]]))


@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (16, 128)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.9, 0.0)])
def test_matches_python_loop_with_holes(device, b, t, gamma, lam):
    g = torch.Generator().manual_seed(b * 1000 + t)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.7  # random holes, some rows may be all masked
    adv, ret = (o.cpu() for o in gae(rewards.to(device), values.to(device), mask.to(device), gamma, lam))
    want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(device, dtype):
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(4, 30, generator=g).to(dtype), torch.randn(4, 30, generator=g).to(dtype)
    mask = torch.rand(4, 30, generator=g) < 0.8
    on = lambda t: t.to(device)  # noqa: E731
    adv, ret = (o.cpu() for o in gae(on(rewards), on(values), on(mask.int()), 0.97, 0.9))  # an integer 0/1 mask works too
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_adv, _ = python_gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv.double(), want_adv, atol=1e-5, rtol=1e-5)


def test_packed_equals_padded(device):
    g = torch.Generator().manual_seed(7)
    lengths = [5, 1, 0, 12, 7]
    t_max = max(lengths)
    rewards = torch.randn(len(lengths), t_max, generator=g).to(device)
    values = torch.randn(len(lengths), t_max, generator=g).to(device)
    mask = (torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]).to(device)  # right padding
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    p_adv, p_ret = gae_packed(rewards[mask], values[mask], offsets, 0.99, 0.95)
    torch.testing.assert_close(p_adv, adv[mask], atol=0, rtol=0)
    torch.testing.assert_close(p_ret, ret[mask], atol=0, rtol=0)


def test_no_grad_even_for_inputs_that_require_it():
    values = torch.randn(2, 4, requires_grad=True)
    adv, ret = gae(torch.randn(2, 4), values, None, 0.9, 0.9)
    assert not adv.requires_grad and not ret.requires_grad


def test_noncontiguous_inputs(device):
    rewards, values = torch.randn(9, 6).t(), torch.randn(9, 6).t()  # [6, 9] strided views
    mask = torch.ones(6, 9, dtype=torch.bool)
    on = lambda t: t.t().to(device).t()  # noqa: E731  (the same strided view on the device)
    adv = gae(on(rewards), on(values), mask.to(device), 0.95, 0.9)[0].cpu()
    torch.testing.assert_close(adv.double(), python_gae(rewards, values, mask, 0.95, 0.9)[0], atol=1e-5, rtol=1e-5)


def test_opcheck(device):
    r, v = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    mask = torch.rand(3, 8, device=device) < 0.5
    torch.library.opcheck(torch.ops.rlhf_engine.gae.default, (r, v, mask, 0.99, 0.95))
    offsets = torch.tensor([0, 10, 24], device=device)
    torch.library.opcheck(torch.ops.rlhf_engine.gae_packed.default, (r.flatten(), v.flatten(), offsets, 0.99, 0.95))


def test_torch_compile(device):
    r, v, m = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device), torch.rand(3, 8, device=device) < 0.5
    f = torch.compile(lambda a, b, c: gae(a, b, c, 0.9, 0.8), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(r, v, m), gae(r, v, m, 0.9, 0.8))


@pytest.mark.parametrize("gamma,lam,name", [(1.5, 0.9, "gamma"), (-0.1, 0.9, "gamma"), (0.9, 1.01, "lam"), (0.9, float("nan"), "lam")])
def test_bad_coefficients(gamma, lam, name):
    with pytest.raises(ValueError, match=name):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), None, gamma, lam)
    with pytest.raises(ValueError, match=name):
        gae_packed(torch.zeros(3), torch.zeros(3), torch.tensor([0, 3]), gamma, lam)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), None), ValueError, "values shape"),
        ((torch.zeros(6), torch.zeros(6), None), ValueError, r"rewards must be \[B, T\]"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), ValueError, "mask shape"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), None), TypeError, "rewards"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), None), TypeError, "values dtype"),
        ((torch.zeros(0, 3), torch.zeros(0, 3), None), ValueError, "empty"),
    ],
)
def test_bad_padded_input(args, exc, match):
    with pytest.raises(exc, match=match):
        gae(*args, 0.9, 0.9)


@pytest.mark.parametrize(
    "offsets,exc,match",
    [
        (torch.tensor([1, 5]), ValueError, r"offsets\[0\] must be 0"),
        (torch.tensor([0, 4]), ValueError, "must equal the packed length 5"),
        (torch.tensor([0, 3, 2, 5]), ValueError, "non-decreasing"),
        (torch.tensor([0.0, 5.0]), TypeError, "offsets must be an integer"),
        (torch.tensor([[0, 5]]), ValueError, r"offsets must be \[B \+ 1\]"),
    ],
)
def test_bad_offsets(offsets, exc, match):
    with pytest.raises(exc, match=match):
        gae_packed(torch.zeros(5), torch.zeros(5), offsets, 0.9, 0.9)
