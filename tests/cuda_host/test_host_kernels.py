"""The CUDA kernels (csrc/cuda/*.cuh) and their op layer, run unchanged on the host backend.

Every case runs the real kernel source with each CUDA thread a fiber under a seeded random
schedule (csrc/host/runtime.h), on small shapes chosen for block/warp/vector boundaries, and
compares with the plain-PyTorch references of rlhf_engine/ops/reference.py (fp64 math).
Inputs sit inside NaN-filled buffers at odd offsets: an out-of-bounds read shows up as NaN,
an out-of-bounds write changes the padding, and rows start at every 16-byte phase.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.ops.reference import full_kl_reference, gae_reference, logprobs_reference, token_kl_reference

KINDS = {"kl": 0, "abs": 1, "mse": 2, "k3": 3}
PAD = 64  # elements of NaN padding on each side


def nan_padded(x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x copied into the middle of a NaN buffer, `offset` elements past a 16-byte boundary.

    Returns (view shaped like x, the whole buffer).
    """
    buf = torch.full((x.numel() + 2 * PAD,), float("nan"), dtype=x.dtype)
    start = PAD + offset
    view = buf[start : start + x.numel()].view(x.shape)
    view.copy_(x)
    return view, buf


def padding_intact(buf: torch.Tensor, offset: int, numel: int) -> bool:
    start = PAD + offset
    return bool(torch.isnan(buf[:start]).all() and torch.isnan(buf[start + numel :]).all())


def random_logits(n: int, v: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)  # [N, V]


def reference_grads(logits, labels, temperature, ignore_index, g_lp, g_ent):
    """d(sum g_lp * logprob + g_ent * entropy) / d logits, in fp64 by autograd of the reference."""
    x = logits.detach().double().clone().requires_grad_()  # a fresh leaf also for fp64 logits
    lp, ent = logprobs_reference(x, labels, temperature, ignore_index)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return x.grad  # [N, V]


# ---- log-probs ------------------------------------------------------------------------------

# V at the boundaries: 1, vector width +- 1 (4 for fp32, 8 for bf16/fp16), warp size +- 1, and
# rows longer than one pass of the block (threads x vector width).
LOGPROB_CASES = [
    (torch.float32, 1, 32),
    (torch.float32, 3, 32),
    (torch.float32, 5, 64),
    (torch.float32, 33, 32),
    (torch.float32, 1000, 64),
    (torch.float64, 31, 32),
    (torch.float64, 301, 64),
    (torch.bfloat16, 7, 32),
    (torch.bfloat16, 9, 32),
    (torch.bfloat16, 32, 64),
    (torch.bfloat16, 2053, 64),
    (torch.float16, 257, 32),
    (torch.bfloat16, 777, 0),  # the block size the CUDA launcher picks (128)
]


@pytest.mark.parametrize("dtype,vocab,threads", LOGPROB_CASES)
def test_logprobs_fwd_matches_reference(host, dtype, vocab, threads):
    n, temperature, ignore = 6, 0.7, -100
    logits = random_logits(n, vocab, dtype, seed=vocab)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    labels[2] = ignore
    for offset in (0, 1, 3):
        x, buf = nan_padded(logits, offset)
        lp, ent, lse = host.logprobs_fwd(x, labels, 1 / temperature, ignore, True, threads=threads, seed=offset)
        ref_lp, ref_ent = logprobs_reference(logits, labels, temperature, ignore)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert lp.dtype == ref_lp.dtype
        torch.testing.assert_close(lp, ref_lp, rtol=tol, atol=tol)
        torch.testing.assert_close(ent, ref_ent, rtol=tol, atol=tol)
        keep = labels != ignore
        ref_lse = torch.logsumexp(logits.double() / temperature, -1).to(lse.dtype)
        torch.testing.assert_close(lse[keep], ref_lse[keep], rtol=tol, atol=tol)
        assert lp[2] == 0 and ent[2] == 0 and lse[2] == 0  # ignored row
        assert padding_intact(buf, offset, logits.numel())


def test_logprobs_fwd_without_entropy_writes_zero_entropy(host):
    logits = random_logits(4, 45, torch.float32, seed=3)
    labels = torch.tensor([0, 44, 7, 13])
    lp, ent, _ = host.logprobs_fwd(logits, labels, 1.0, -100, False, threads=32)
    torch.testing.assert_close(lp, logprobs_reference(logits, labels)[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(ent, torch.zeros(4))


def test_logprobs_ignore_index_may_be_a_vocabulary_id(host):
    logits = random_logits(5, 40, torch.float32, seed=4)
    labels = torch.tensor([3, 5, 3, 0, 39])
    lp, ent, _ = host.logprobs_fwd(logits, labels, 1.0, 3, True, threads=32)
    ref_lp, ref_ent = logprobs_reference(logits, labels, 1.0, ignore_index=3)
    torch.testing.assert_close(lp, ref_lp, rtol=2e-5, atol=2e-5)
    assert lp[0] == 0 and lp[2] == 0 and ent[0] == 0


def test_logprobs_label_out_of_range_gives_nan_without_reading(host):
    logits = random_logits(2, 10, torch.float32, seed=5)
    lp, ent, _ = host.logprobs_fwd(logits, torch.tensor([10, -7]), 1.0, -100, True, threads=32)
    assert torch.isnan(lp).all()
    assert torch.isfinite(ent).all()  # the row statistics are still valid


@pytest.mark.parametrize("dtype,vocab,threads", LOGPROB_CASES)
def test_logprobs_bwd_matches_autograd_of_reference(host, dtype, vocab, threads):
    n, temperature, ignore = 5, 1.3, -100
    logits = random_logits(n, vocab, dtype, seed=vocab + 1)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(2))
    labels[1] = ignore
    gen = torch.Generator().manual_seed(3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp = torch.randn(n, generator=gen, dtype=acc)
    g_ent = torch.randn(n, generator=gen, dtype=acc)
    lp, ent, lse = host.logprobs_fwd(logits, labels, 1 / temperature, ignore, True, threads=threads)
    ref = reference_grads(logits, labels, temperature, ignore, g_lp, g_ent)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    scale = max(ref.abs().max().item(), 1.0)
    x, _ = nan_padded(logits, 1)
    grad = host.logprobs_bwd(g_lp, g_ent, x, labels, lse, ent, 1 / temperature, ignore, threads=threads, seed=7)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), ref, rtol=tol, atol=tol * scale)
    assert torch.equal(grad[1], torch.zeros(vocab, dtype=dtype))
    # no entropy gradient: the logprob term only
    ref_lp_only = reference_grads(logits, labels, temperature, ignore, g_lp, torch.zeros(n, dtype=acc))
    grad_lp_only = host.logprobs_bwd(g_lp, torch.empty(0), logits, labels, lse, ent, 1 / temperature, ignore,
                                     threads=threads)
    torch.testing.assert_close(grad_lp_only.double(), ref_lp_only, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype,vocab,offset", [(torch.bfloat16, 37, 3), (torch.float32, 130, 1), (torch.float16, 8, 0)])
def test_logprobs_bwd_in_place_overwrites_logits_with_the_gradient(host, dtype, vocab, offset):
    n = 4
    logits = random_logits(n, vocab, dtype, seed=9)
    labels = torch.tensor([0, vocab - 1, -100, vocab // 2])
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    lp, ent, lse = host.logprobs_fwd(logits, labels, 1.0, -100, True, threads=32)
    expected = host.logprobs_bwd(g_lp, g_ent, logits, labels, lse, ent, 1.0, -100, threads=32)
    x, buf = nan_padded(logits, offset)
    out = host.logprobs_bwd(g_lp, g_ent, x, labels, lse, ent, 1.0, -100, in_place=True, threads=32, seed=4)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x, expected)
    assert padding_intact(buf, offset, logits.numel())


def test_logprobs_results_do_not_depend_on_the_interleaving(host):
    logits = random_logits(3, 999, torch.bfloat16, seed=11)
    labels = torch.tensor([5, 998, 0])
    runs = [host.logprobs_fwd(logits, labels, 1.0, -100, True, threads=64, seed=s, yield_prob=p)
            for s, p in [(0, 0.0), (1, 0.25), (2, 0.9), (3, 0.5)]]
    for lp, ent, lse in runs[1:]:
        assert torch.equal(lp, runs[0][0]) and torch.equal(ent, runs[0][1]) and torch.equal(lse, runs[0][2])


def test_logprobs_launcher_checks_name_the_tensor(host):
    logits = random_logits(2, 8, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        host.logprobs_fwd(logits, torch.tensor([1, 2], dtype=torch.int32), 1.0, -100, True)
    with pytest.raises(RuntimeError, match=r"labels must have shape \[2\]"):
        host.logprobs_fwd(logits, torch.tensor([1, 2, 3]), 1.0, -100, True)
    with pytest.raises(RuntimeError, match="logits must be float32, float64, bfloat16 or float16"):
        host.logprobs_fwd(logits.to(torch.int32), torch.tensor([1, 2]), 1.0, -100, True)
    with pytest.raises(RuntimeError, match="inv_temperature must be positive"):
        host.logprobs_fwd(logits, torch.tensor([1, 2]), 0.0, -100, True)


# ---- token KL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype,n", [(torch.float32, 1), (torch.float32, 1000), (torch.float64, 257), (torch.bfloat16, 300)])
def test_token_kl_fwd_bwd_match_reference(host, kind, dtype, n):
    gen = torch.Generator().manual_seed(n)
    logp = (-torch.rand(n, generator=gen, dtype=torch.float64) * 5).to(dtype)
    ref = (-torch.rand(n, generator=gen, dtype=torch.float64) * 5).to(dtype)
    if n > 2:
        ref[1] = logp[1]  # d = 0: abs has gradient 0 there
    out = host.token_kl_fwd(logp, ref, KINDS[kind], seed=n)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), token_kl_reference(logp.double(), ref.double(), kind), rtol=tol, atol=tol)
    grad = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    g_logp, g_ref = host.token_kl_bwd(grad, logp, ref, KINDS[kind], seed=n + 1)
    a = logp.double().clone().requires_grad_()
    b = ref.double().clone().requires_grad_()
    (token_kl_reference(a, b, kind) * grad.double()).sum().backward()
    torch.testing.assert_close(g_logp.double(), a.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(g_ref.double(), b.grad, rtol=tol, atol=tol)


# ---- full KL ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,vocab,threads", [(torch.float32, 1, 32), (torch.float32, 33, 32), (torch.bfloat16, 9, 32),
                                                 (torch.bfloat16, 1100, 64), (torch.float64, 70, 32), (torch.float16, 515, 0)])
def test_full_kl_fwd_bwd_match_reference(host, dtype, vocab, threads):
    n, temperature = 4, 0.9
    logits = random_logits(n, vocab, dtype, seed=vocab)
    ref_logits = random_logits(n, vocab, dtype, seed=vocab + 100)
    x, xbuf = nan_padded(logits, 1)
    xr, _ = nan_padded(ref_logits, 2)  # a different 16-byte phase from x: the scalar path
    for a, b in [(logits, ref_logits), (x, xr), (x, ref_logits)]:
        kl, lse, ref_lse = host.full_kl_fwd(a, b, 1 / temperature, threads=threads, seed=vocab)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(kl.double(), full_kl_reference(logits, ref_logits, temperature).double(),
                                   rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double() / temperature, -1), rtol=tol, atol=tol)
    torch.testing.assert_close(ref_lse.double(), torch.logsumexp(ref_logits.double() / temperature, -1), rtol=tol, atol=tol)
    grad = torch.randn(n, dtype=kl.dtype)
    p = logits.double().clone().requires_grad_()
    q = ref_logits.double().clone().requires_grad_()
    (full_kl_reference(p, q, temperature) * grad.double()).sum().backward()
    gtol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for ref_grad in (True, False):
        g_x, g_ref = host.full_kl_bwd(grad, x, ref_logits, kl, lse, ref_lse, 1 / temperature, ref_grad,
                                      threads=threads, seed=3)
        torch.testing.assert_close(g_x.double(), p.grad, rtol=gtol, atol=gtol * max(p.grad.abs().max().item(), 1.0))
        if ref_grad:
            torch.testing.assert_close(g_ref.double(), q.grad, rtol=gtol, atol=gtol * max(q.grad.abs().max().item(), 1.0))
        else:
            assert g_ref.numel() == 0
    assert padding_intact(xbuf, 1, logits.numel())


# ---- GAE ----------------------------------------------------------------------------------------

def gae_inputs(b: int, t: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64).to(dtype)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(b, t, generator=gen) < 0.7  # holes anywhere
    mask[0] = True  # fully valid row
    if b > 1:
        mask[1] = False  # fully masked row
    if b > 2:
        mask[2, : t // 2] = False  # left padding
    return rewards, values, mask


@pytest.mark.parametrize("t", [1, 2, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_scan_matches_the_reverse_loop(host, t, dtype):
    rewards, values, mask = gae_inputs(5, t, dtype, seed=t)
    for gamma, lam in [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)]:
        adv, ret = host.gae(rewards, values, mask, gamma, lam, small_tiles=True, seed=t)
        ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(adv, ref_adv.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(ret, ref_ret.to(dtype), rtol=tol, atol=tol)
        assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
        assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


def test_gae_production_tiles_span_several_tiles(host):
    rewards, values, mask = gae_inputs(3, 2100, torch.float32, seed=0)  # tiles of 1024: three per row
    adv, ret = host.gae(rewards, values, mask, 0.99, 0.95, small_tiles=False, seed=5)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed(host):
    """A 4-step row with a hole, gamma = 0.5, lam = 1 (c = 0.5), checked by hand:

    valid t = 0, 1, 3 (t = 2 masked); next values 0 -> V3 = 4 -> V1 = 2
      A3 = r3 - V3 = 1 - 4 = -3
      A1 = r1 + 0.5 * V3 - V1 + 0.5 * A3 = 1 + 2 - 2 - 1.5 = -0.5
      A0 = r0 + 0.5 * V1 - V0 + 0.5 * A1 = 1 + 1 - 1 - 0.25 = 0.75
    """
    rewards = torch.tensor([[1.0, 1.0, 9.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 9.0, 4.0]])
    mask = torch.tensor([[True, True, False, True]])
    adv, ret = host.gae(rewards, values, mask, 0.5, 1.0, small_tiles=True)
    assert adv.tolist() == [[0.75, -0.5, 0.0, -3.0]]
    assert ret.tolist() == [[1.75, 1.5, 0.0, 1.0]]


@pytest.mark.parametrize("small_tiles", [True, False])
def test_gae_packed_equals_per_sequence_gae(host, small_tiles):
    lengths = [1, 129, 40, 0, 300]
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    rewards = torch.randn(total, generator=gen)
    values = torch.randn(total, generator=gen)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    adv, ret = host.gae_packed(rewards, values, offsets, 0.97, 0.9, small_tiles=small_tiles, seed=2)
    for i, n in enumerate(lengths):
        lo, hi = offsets[i].item(), offsets[i + 1].item()
        ones = torch.ones(1, n, dtype=torch.bool)
        ref_adv, ref_ret = gae_reference(rewards[lo:hi][None], values[lo:hi][None], ones, 0.97, 0.9)
        torch.testing.assert_close(adv[lo:hi], ref_adv[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[lo:hi], ref_ret[0], rtol=1e-5, atol=1e-5)


def test_gae_packed_clamps_offsets_past_the_end(host):
    rewards, values = torch.ones(10), torch.zeros(10)
    adv, _ = host.gae_packed(rewards, values, torch.tensor([0, 4, 50]), 1.0, 1.0)
    assert adv.tolist() == [4.0, 3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


def test_gae_checks_name_the_argument(host):
    r = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"gamma must be in \[0, 1\]"):
        host.gae(r, r, r > 0, 1.5, 0.9)
    with pytest.raises(RuntimeError, match="mask must have the shape of rewards"):
        host.gae(r, r, torch.ones(2, 4, dtype=torch.bool), 0.9, 0.9)
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        host.gae_packed(torch.zeros(3), torch.zeros(3), torch.tensor([0, 3], dtype=torch.int32), 0.9, 0.9)


# ---- the harness can fail: missing barriers are caught ------------------------------------------

SEEDS = range(12)


def two_sums_expected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.double().sum(1), (x.double() ** 2).sum(1)


def two_sums_correct(host, x, variant, seed) -> bool:
    sums, sums_sq = host.two_sums(x, variant, threads=128, seed=seed)
    want, want_sq = two_sums_expected(x)
    # fp32 sums of 500 values in the kernel's order: a sum near 0 needs an absolute tolerance (a race is off by
    # whole partial sums, orders of magnitude more)
    return bool(torch.allclose(sums.double(), want[:, None].expand_as(sums), rtol=1e-5, atol=1e-4)
                and torch.allclose(sums_sq.double(), want_sq, rtol=1e-5))


def test_correct_barriers_pass_every_interleaving(host):
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    assert all(two_sums_correct(host, x, "correct", s) for s in SEEDS)


@pytest.mark.parametrize("variant", ["no_barrier_after_write", "no_barrier_before_reuse"])
def test_missing_barrier_fails_under_some_interleaving(host, variant):
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    outcomes = [two_sums_correct(host, x, variant, s) for s in SEEDS]
    assert not all(outcomes), f"{variant}: the race went unnoticed under all {len(outcomes)} schedules"
    # a seed names one schedule: the same seed reproduces the same outcome
    assert [two_sums_correct(host, x, variant, s) for s in SEEDS] == outcomes


# ---- the harness reports what a GPU would get wrong silently -------------------------------------

def test_fault_free_kernel_runs(host):
    assert host.fault(0).tolist() == [float(t % 8 + 1) for t in range(64)]


@pytest.mark.parametrize(
    "kind,message",
    [(1, "deadlock"), (2, "not aligned to 16 bytes"), (3, "deadlock")],
    ids=["sync_block in a divergent branch", "misaligned 16-byte load", "shuffle reached by half a warp"],
)
def test_host_backend_reports_faults(host, kind, message):
    for seed in range(3):
        with pytest.raises(RuntimeError, match=message):
            host.fault(kind, seed)
