"""logprobs_from_hidden: chunked LM head + log-probs vs the eager reference (values, entropy,
gradients of hidden/weight/bias), chunk invariance, tied embeddings, gradcheck, opcheck, compile,
bad input."""

import math

import pytest
import torch

from rlhf_engine.ops import logprobs_from_hidden
from rlhf_engine.ops._library import resolve_device
from rlhf_engine.ops.hidden_logprobs import default_chunk_tokens
from rlhf_engine.ops.reference import logprobs_from_hidden_reference

# The op and the reference compute the logits in the inputs' dtype; bf16 logits of a chunk and
# of the whole [N, V] product may round differently by one ulp (2^-8 relative at |z| ~ 8), and
# bf16 grad_weight is accumulated chunk by chunk (one rounding per chunk).
TOL = {
    torch.float32: dict(fwd=dict(atol=5e-5, rtol=1e-5), grad=dict(atol=2e-5, rtol=1e-4)),
    torch.bfloat16: dict(fwd=dict(atol=6e-2, rtol=1e-2), grad=dict(atol=2e-2, rtol=3e-2)),
}
SHAPES = [(1, 3, 5), (37, 16, 50), (130, 24, 1001)]  # (N, H, V), odd sizes


def _inputs(n, h, v, dtype, device, ignore=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (3 / math.sqrt(h))  # logits with std ~3
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore:
        labels[torch.rand(n, generator=g) < 0.3] = -100
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def _run(fn, hidden, weight, bias, labels, w_lp, w_ent, **kw):
    """Forward with entropy, backward of sum(w_lp * logprob + w_ent * entropy); returns outputs and grads."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = fn(*leaves, labels, **kw)
    (lp * w_lp + ent * w_ent).sum().backward()
    return lp, ent, [t.grad if t is not None else None for t in leaves]


def _op(hidden, weight, bias, labels, temperature=1.0, chunk_tokens=None):
    return logprobs_from_hidden(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True, chunk_tokens=chunk_tokens
    )


def _ref(hidden, weight, bias, labels, temperature=1.0, chunk_tokens=None):
    return logprobs_from_hidden_reference(hidden, weight, labels, bias, temperature)


# bf16 grad_weight is rounded once per chunk: chunk_tokens=1 would round it N times (fp32 only).
@pytest.mark.parametrize(
    "dtype,chunk_tokens",
    [(torch.float32, 1), (torch.float32, 16), (torch.float32, None), (torch.bfloat16, 16), (torch.bfloat16, None)],
)
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_eager_lm_head(device, dtype, n, h, v, chunk_tokens, temperature):
    hidden, weight, bias, labels = _inputs(n, h, v, dtype, device)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    lp, ent, grads = _run(_op, hidden, weight, bias, labels, w_lp, w_ent, temperature=temperature, chunk_tokens=chunk_tokens)
    rlp, rent, rgrads = _run(_ref, hidden, weight, bias, labels, w_lp, w_ent, temperature=temperature)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    torch.testing.assert_close(lp, rlp, **TOL[dtype]["fwd"])
    torch.testing.assert_close(ent, rent, **TOL[dtype]["fwd"])
    for name, got, want in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype]["grad"], msg=lambda m: f"grad {name}: {m}")
    ignored = labels == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grads[0][ignored] == 0)


def test_hand_computed_row(device):
    # H = 1, hidden = [1], weight = [0, ln 2, ln 5] -> logits [0, ln 2, ln 5] -> softmax [1/8, 2/8, 5/8];
    # label 1 -> log(1/4) = -1.3862944; entropy = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8) = 0.9002561
    weight = torch.tensor([[0.0], [math.log(2)], [math.log(5)]], device=device)
    lp, ent = logprobs_from_hidden(torch.ones(1, 1, device=device), weight, torch.tensor([1], device=device),
                                   return_entropy=True)
    torch.testing.assert_close(lp.cpu(), torch.tensor([-1.3862944]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.cpu(), torch.tensor([0.9002561]), atol=1e-6, rtol=0)


def test_chunk_size_does_not_change_fp32_results(device):
    hidden, weight, bias, labels = _inputs(50, 8, 300, torch.float32, device)
    w = torch.ones(50, device=device)
    base = _run(_op, hidden, weight, bias, labels, w, w, chunk_tokens=50)
    for chunk in (1, 7, 49, 1000):
        got = _run(_op, hidden, weight, bias, labels, w, w, chunk_tokens=chunk)
        torch.testing.assert_close(got[0], base[0], atol=5e-6, rtol=0)  # GEMM blocking differs by M
        for a, b in zip(got[2], base[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tied_embedding_gradients_add_up(device):
    # The LM head shares its weight with the input embedding: d loss / d E sums both uses.
    v, h, n = 40, 12, 9
    torch.manual_seed(0)
    emb = torch.nn.Embedding(v, h).to(device)
    ids = torch.randint(0, v, (n,), device=device)
    labels = torch.randint(0, v, (n,), device=device)

    def loss(fn):
        emb.weight.grad = None
        hidden = torch.tanh(emb(ids))  # [n, h], a stand-in for the transformer
        lp, ent = fn(hidden, emb.weight, None, labels, chunk_tokens=4)
        (lp.sum() - 0.1 * ent.sum()).backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(loss(_op), loss(_ref), atol=2e-5, rtol=1e-4)


def test_frozen_weight_gets_no_gradient_and_hidden_grad_is_right(device):
    hidden, weight, _, labels = _inputs(11, 6, 30, torch.float32, device, bias=False)
    x = hidden.clone().requires_grad_()
    xr = hidden.clone().requires_grad_()
    logprobs_from_hidden(x, weight, labels, chunk_tokens=4).sum().backward()
    logprobs_from_hidden_reference(xr, weight, labels)[0].sum().backward()
    assert not weight.requires_grad and weight.grad is None
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-5, rtol=1e-4)


def test_leading_dims(device):
    hidden, weight, bias, labels = _inputs(12, 5, 17, torch.float32, device)
    lp = logprobs_from_hidden(hidden.reshape(3, 4, 5), weight, labels.reshape(3, 4), bias=bias)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp.reshape(-1), logprobs_from_hidden_reference(hidden, weight, labels, bias)[0])


def test_gradcheck_fp64(device):
    hidden, weight, bias, labels = _inputs(7, 4, 9, torch.float64, device)
    labels[2] = -100
    args = [t.requires_grad_() for t in (hidden, weight, bias)]

    def f(x, w, b):
        return logprobs_from_hidden(x, w, labels, bias=b, temperature=0.8, return_entropy=True, chunk_tokens=3)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    hidden, weight, bias, labels = _inputs(9, 6, 21, dtype, device)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, 1.25, -100, True, 4)
    torch.library.opcheck(torch.ops.rlhf_engine.hidden_logprobs_fwd.default, args)
    lp, ent, lse = torch.ops.rlhf_engine.hidden_logprobs_fwd(*(t.detach() if torch.is_tensor(t) else t for t in args))
    grads = (torch.randn(9).to(device), torch.randn(9).to(device))
    for needs in ((True, True, True), (True, False, False)):
        torch.library.opcheck(
            torch.ops.rlhf_engine.hidden_logprobs_bwd.default,
            (*grads, hidden.detach(), weight.detach(), bias.detach(), labels, lse, ent, 1.25, -100, 4, *needs),
        )


def test_torch_compile_fullgraph_matches_eager(device):
    hidden, weight, bias, labels = _inputs(13, 8, 50, torch.float32, device)

    def loss(x, w, b):
        lp, ent = logprobs_from_hidden(x, w, labels, bias=b, temperature=0.9, return_entropy=True, chunk_tokens=5)
        return (lp - 0.1 * ent).sum()

    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    l1 = compiled(*a)
    l1.backward()
    l2 = loss(*b)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_default_chunk_keeps_a_chunk_of_logits_near_128_mib():
    assert default_chunk_tokens(151936, torch.float32) == 220  # 128 MiB / (151936 * 4 B) = 220.8
    assert default_chunk_tokens(151936, torch.bfloat16) == 441
    assert default_chunk_tokens(32000, torch.float32) == 1024  # 1048 capped
    assert default_chunk_tokens(50, torch.float32) == 1024  # capped
    assert default_chunk_tokens(10**8, torch.float32) == 16  # floored


def _h(n=4, h=3):
    return torch.randn(n, h)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(hidden=_h(4, 3), weight=torch.randn(10, 5)), ValueError, r"hidden has H = 3 .* weight \[V, H\] has H = 5"),
        (dict(weight=torch.randn(30)), ValueError, r"weight must be the LM head weight \[V, H\]"),
        (dict(weight=torch.randn(2, 10, 3)), ValueError, r"weight must be the LM head weight \[V, H\]"),
        (dict(weight=torch.randn(10, 3).double()), TypeError, "weight dtype"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), IndexError, r"labels\[2\] = 10 is out of range for V = 10"),
        (dict(labels=torch.tensor([0, -1, 1, 2])), IndexError, r"labels\[1\] = -1"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "do not line up"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens must be a positive int"),
        (dict(chunk_tokens=-4), ValueError, "chunk_tokens must be a positive int"),
        (dict(chunk_tokens=2.0), ValueError, "chunk_tokens must be a positive int"),
        (dict(bias=torch.randn(9)), ValueError, r"bias must be a \[10\] tensor"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(hidden="h"), TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_naming_argument(kwargs, exc, match):
    args = dict(hidden=_h(), weight=torch.randn(10, 3), labels=torch.tensor([0, 1, 2, -100]))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(exc, match=match):
        logprobs_from_hidden(hidden, weight, labels, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_requested_without_cuda_names_the_argument():
    with pytest.raises(RuntimeError, match=r"device='cuda' needs CUDA, but .*(CPU-only build|no CUDA device)"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
