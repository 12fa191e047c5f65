"""token_kl: per-token estimators and the fused full-vocabulary KL vs references; gradcheck, opcheck, bad input."""

import math

import pytest
import torch

from rlhf_engine.ops import token_kl
from rlhf_engine.ops.reference import full_kl_reference, token_kl_reference
from tests.helpers.tolerances import FWD, GRAD

KINDS = ["kl", "abs", "mse", "k3"]


def test_hand_computed_estimators(device):
    # logp = -1, ref = -2: d = 1 -> kl 1, abs 1, mse 0.5, k3 = e^-1 + 1 - 1 = 0.36787944
    # logp = -2, ref = -1: d = -1 -> kl -1, abs 1, mse 0.5, k3 = e^1 - 1 - 1 = 0.71828183
    logp, ref = torch.tensor([-1.0, -2.0], device=device), torch.tensor([-2.0, -1.0], device=device)
    expected = {"kl": [1.0, -1.0], "abs": [1.0, 1.0], "mse": [0.5, 0.5], "k3": [math.exp(-1), math.e - 2]}
    for kind, want in expected.items():
        torch.testing.assert_close(token_kl(logp, ref, kind).cpu(), torch.tensor(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 257), (4, 5, 7)])
def test_estimators_match_reference(device, kind, dtype, shape):
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    ref = (-3 * torch.rand(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    out = token_kl(logp, ref, kind)
    want = token_kl_reference(logp.float(), ref.float(), kind)
    tol = FWD[torch.float32] if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16 output
    torch.testing.assert_close(out.float(), want, **tol)
    w = torch.randn(shape, generator=g).to(device)
    gl, gr = torch.autograd.grad((out.float() * w).sum(), (logp, ref))
    rl, rr = torch.autograd.grad((want * w).sum(), (logp, ref))
    torch.testing.assert_close(gl.float(), rl.float(), **tol)
    torch.testing.assert_close(gr.float(), rr.float(), **tol)


def test_mask_zeroes_positions_even_when_nonfinite(device):
    logp = torch.tensor([[-1.0, float("-inf")], [-0.5, -0.25]], device=device)
    ref = torch.tensor([[-2.0, -1.0], [-0.5, -0.5]], device=device)
    mask = torch.tensor([[True, False], [True, True]], device=device)
    out = token_kl(logp, ref, "k3", mask=mask).cpu()
    assert out[0, 1] == 0 and out[1, 0] == 0
    torch.testing.assert_close(out[1, 1], torch.tensor(math.exp(-0.25) + 0.25 - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 512), (4, 32000)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_full_kl_matches_reference(device, dtype, shape, temperature):
    g = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    ref_logits = (2 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    kl = token_kl(x, y, "full", temperature=temperature)
    xr, yr = logits.float().requires_grad_(), ref_logits.float().requires_grad_()
    want = full_kl_reference(xr, yr, temperature)
    assert kl.shape == shape[:-1] and kl.dtype == torch.float32
    torch.testing.assert_close(kl, want, atol=1e-4, rtol=1e-4)
    w = torch.randn(shape[:-1], generator=g).to(device)
    (kl * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, **GRAD[dtype])
    torch.testing.assert_close(y.grad.float(), yr.grad, **GRAD[dtype])


def test_full_kl_of_identical_logits_is_zero_and_ref_grad_skipped(device):
    x = torch.randn(3, 100, device=device, requires_grad=True)
    kl = token_kl(x, x.detach().clone(), "full")
    assert kl.abs().max() < 1e-5
    kl.sum().backward()
    assert x.grad.abs().max() < 1e-6


@pytest.mark.parametrize("kind", [*KINDS, "full"])
def test_gradcheck_fp64(device, kind):
    g = torch.Generator().manual_seed(3)
    shape = (3, 6) if kind == "full" else (4, 3)
    a = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: token_kl(p, q, kind, temperature=0.9 if kind == "full" else 1.0), (a, b))


def test_opcheck(device):
    a, b = (torch.randn(3, 5, device=device, requires_grad=True) for _ in range(2))
    for kind in range(4):
        torch.library.opcheck(torch.ops.rlhf_engine.token_kl_fwd.default, (a, b, kind))
        torch.library.opcheck(
            torch.ops.rlhf_engine.token_kl_bwd.default, (torch.randn(3, 5, device=device), a.detach(), b.detach(), kind)
        )
    x, y = (torch.randn(4, 33, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.rlhf_engine.full_kl_fwd.default, (x, y, 1.3))
    kl, lse, ref_lse = torch.ops.rlhf_engine.full_kl_fwd(x.detach(), y.detach(), 1.3)
    for ref_grad in (True, False):
        torch.library.opcheck(
            torch.ops.rlhf_engine.full_kl_bwd.default,
            (torch.randn(4, device=device), x.detach(), y.detach(), kl, lse, ref_lse, 1.3, ref_grad),
        )


def test_torch_compile_full_kl(device):
    x, y = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    f = torch.compile(lambda a, b: token_kl(a, b, "full"), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x, y), token_kl(x, y, "full"))


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(3), torch.zeros(3)), dict(kind="k2"), ValueError, "kind"),
        ((torch.zeros(3), torch.zeros(4)), {}, ValueError, "ref_logp shape"),
        ((torch.zeros(3), torch.zeros(3, dtype=torch.float64)), {}, TypeError, "ref_logp dtype"),
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3)), {}, TypeError, "logp"),
        ((torch.zeros(0), torch.zeros(0)), {}, ValueError, "empty"),
        ((torch.zeros(3), torch.zeros(3)), dict(mask=torch.ones(4)), ValueError, "mask shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), dict(kind="full", temperature=0.0), ValueError, "temperature"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        token_kl(*args, **kwargs)
