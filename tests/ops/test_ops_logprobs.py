"""logprobs_from_logits: kernel vs reference (values, entropy, gradients), gradcheck, opcheck, compile, bad input."""

import pytest
import torch

from rlhf_engine.ops import logprobs_from_logits
from rlhf_engine.ops.reference import logprobs_reference
from tests.helpers.tolerances import FWD, GRAD

NS = [1, 3, 257, 4096]
VS = [1, 7, 512, 32000, 151936]
MAX_ELEMS = 1 << 24  # skip the giant combos (e.g. 4096 x 151936): they only add minutes
SHAPES = [(n, v) for n in NS for v in VS if n * v <= MAX_ELEMS]


def _inputs(n, v, dtype, ignore, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore:
        labels[torch.rand(n, generator=g) < 0.3] = -100
    return logits.to(device), labels.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("ignore,temperature", [(False, 1.0), (True, 0.7)])
def test_matches_reference_values_and_grads(device, n, v, dtype, ignore, temperature):
    logits, labels = _inputs(n, v, dtype, ignore, device=device)
    x = logits.clone().requires_grad_()
    lp, ent = logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True)
    xr = logits.float().requires_grad_()
    rlp, rent = logprobs_reference(xr, labels, temperature)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    torch.testing.assert_close(lp, rlp, **FWD[dtype])
    torch.testing.assert_close(ent, rent, atol=2e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    (lp * w_lp + ent * w_ent).sum().backward()
    (rlp * w_lp + rent * w_ent).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), xr.grad, **GRAD[dtype])
    if ignore:
        ignored = labels == -100
        assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
        assert torch.all(x.grad[ignored] == 0)


def test_fp16_and_logprob_only_grad(device):
    logits, labels = _inputs(5, 1000, torch.float16, ignore=False, device=device)
    x = logits.clone().requires_grad_()
    logprobs_from_logits(x, labels).sum().backward()
    xr = logits.float().requires_grad_()
    logprobs_reference(xr, labels)[0].sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, **GRAD[torch.float16])


def test_hand_computed_row(device):
    # logits [0, ln 2, ln 5] -> softmax [1/8, 2/8, 5/8]; label 1 -> log(1/4); entropy = -sum p log p
    logits = torch.tensor([[0.0, 0.6931471805599453, 1.6094379124341003]], device=device)
    lp, ent = (o.cpu() for o in logprobs_from_logits(logits, torch.tensor([1], device=device), return_entropy=True))
    p = torch.tensor([1 / 8, 2 / 8, 5 / 8], dtype=torch.float64)
    torch.testing.assert_close(lp, torch.tensor([-1.3862943611198906]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum().reshape(1), atol=1e-6, rtol=0)


def test_v_equals_one_gives_zero_logprob_entropy_and_grad(device):
    x = torch.randn(4, 1, device=device, requires_grad=True)
    lp, ent = logprobs_from_logits(x, torch.zeros(4, dtype=torch.long, device=device), return_entropy=True)
    assert torch.all(lp == 0) and torch.all(ent.abs() < 1e-6)
    (lp + ent).sum().backward()
    assert torch.all(x.grad.abs() < 1e-6)


def test_leading_dims_and_noncontiguous_input(device):
    base = torch.randn(7, 2, 3, 11, device=device)  # [V, B, ..., ] -> permuted to [B, T, V] non-contiguous
    logits = base.permute(1, 2, 3, 0)[..., :7]  # [2, 3, 11, 7]: a strided view
    assert not logits.is_contiguous()
    labels = torch.randint(0, 7, (2, 3, 11), device=device)
    lp = logprobs_from_logits(logits, labels)
    assert lp.shape == (2, 3, 11)
    torch.testing.assert_close(lp, logprobs_reference(logits.contiguous(), labels)[0], **FWD[torch.float32])


def test_int32_labels_accepted(device):
    logits, labels = _inputs(3, 50, torch.float32, ignore=False, device=device)
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels.int()), logprobs_from_logits(logits, labels), atol=0, rtol=0
    )


def test_masked_vocab_and_large_logits_stay_finite(device):
    logits = torch.randn(3, 100, device=device) * 1e4  # huge scale: naive exp would overflow
    logits[:, 50:] = float("-inf")  # masked vocabulary entries
    labels = torch.tensor([0, 10, 49], device=device)
    lp = logprobs_from_logits(logits, labels)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0])


def test_custom_ignore_index(device):
    logits, labels = _inputs(6, 20, torch.float32, ignore=False, device=device)
    labels[2] = 5
    lp = logprobs_from_logits(logits, labels, ignore_index=5)
    assert lp[2] == 0 and torch.all(lp[labels != 5] < 0)


def test_gradcheck_fp64(device):
    logits, labels = _inputs(3, 9, torch.float64, ignore=False, device=device)
    labels[1] = -100
    x = logits.requires_grad_()

    def f(z):
        return logprobs_from_logits(z, labels, temperature=0.8, return_entropy=True)

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    logits, labels = _inputs(4, 33, dtype, ignore=True, device=device)
    x = logits.requires_grad_()
    torch.library.opcheck(torch.ops.rlhf_engine.logprobs_fwd.default, (x, labels, 1.25, -100, True))
    lp, ent, lse = torch.ops.rlhf_engine.logprobs_fwd(logits.detach(), labels, 1.25, -100, True)
    torch.library.opcheck(
        torch.ops.rlhf_engine.logprobs_bwd.default,
        (torch.randn(4, device=device), torch.randn(4, device=device), logits.detach(), labels, lse, ent, 1.25, -100),
    )
    torch.library.opcheck(
        torch.ops.rlhf_engine.logprobs_bwd_inplace.default,
        (torch.randn(4, device=device), torch.empty(0, device=device), logits.detach().clone(), labels, lse, ent, 1.25, -100),
    )


def test_torch_compile_matches_eager(device):
    logits, labels = _inputs(6, 40, torch.float32, ignore=True, device=device)

    def loss(z):
        lp, ent = logprobs_from_logits(z, labels, temperature=0.9, return_entropy=True)
        return (lp - 0.1 * ent).sum()

    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    l1 = compiled(x1)
    l1.backward()
    l2 = loss(x2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 5).long(), torch.zeros(2, dtype=torch.long)), TypeError, "logits"),
        (lambda: (torch.randn(2, 5), torch.zeros(2)), TypeError, "labels"),
        (lambda: (torch.randn(2, 5), torch.zeros(3, dtype=torch.long)), ValueError, "do not line up"),
        (lambda: (torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
        (lambda: (torch.randn(2, 0), torch.zeros(2, dtype=torch.long)), ValueError, "vocabulary"),
        (lambda: (torch.randn(2, 5), torch.tensor([0, 5])), IndexError, r"labels\[1\] = 5 is out of range"),
        (lambda: (torch.randn(2, 5), torch.tensor([-1, 0])), IndexError, r"labels\[0\] = -1"),
        (lambda: ("logits", torch.zeros(2, dtype=torch.long)), TypeError, "logits"),
    ],
)
def test_bad_input_raises_naming_argument(make, exc, match):
    logits, labels = make()
    with pytest.raises(exc, match=match):
        logprobs_from_logits(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_entropy_with_masked_vocab_is_entropy_over_the_rest(device):
    logits = torch.randn(4, 5000, device=device)
    logits[:, 1000:] = float("-inf")  # a masked tail: those tokens have probability 0
    labels = torch.tensor([0, 1, 2, 999], device=device)
    _, ent = logprobs_from_logits(logits, labels, return_entropy=True)
    _, want = logprobs_reference(logits[:, :1000], labels)
    torch.testing.assert_close(ent, want, atol=2e-4, rtol=1e-4)


def test_max_jump_in_a_later_block(device):
    # The running max is seeded from the first 2048-column block; a far larger logit later in
    # the row forces the kernel to rescale (and, past 2^60, to sum that block again).
    logits = torch.full((3, 10000), -40.0) + torch.randn(3, 10000)
    logits[0, 5000] = 60.0  # a jump of ~100 nats: the redo path
    logits[1, 9999] = -20.0  # a modest jump: the rescale path
    logits, labels = logits.to(device), torch.tensor([5000, 9999, 7], device=device)
    x = logits.clone().requires_grad_()
    lp, ent = logprobs_from_logits(x, labels, return_entropy=True)
    xr = logits.clone().requires_grad_()
    rlp, rent = logprobs_reference(xr, labels)
    torch.testing.assert_close(lp, rlp, **FWD[torch.float32])
    torch.testing.assert_close(ent, rent, atol=2e-4, rtol=1e-4)
    (lp + ent).sum().backward()
    (rlp + rent).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **GRAD[torch.float32])


@pytest.mark.parametrize("label", [5, -1])
def test_label_out_of_range_raises_on_every_device(device, label):
    # One contract: IndexError at op entry on CPU and CUDA alike (the CUDA kernel alone would give NaN).
    labels = torch.tensor([0, label], device=device)
    with pytest.raises(IndexError, match=rf"labels\[1\] = {label} is out of range for V = 5"):
        logprobs_from_logits(torch.randn(2, 5, device=device), labels)
