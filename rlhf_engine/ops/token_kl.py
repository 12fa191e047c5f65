"""Per-token KL between policy and reference: `token_kl`.

kind (per token, d = logp - ref_logp):
  "kl"  k1:  d
  "abs":     |d|
  "mse" k2:  0.5 * d^2
  "k3":      exp(-d) + d - 1
  "full":    exact KL(pi || pi_ref) over the vocabulary from logits [..., V] and ref_logits [..., V],
             fused (`rlhf_engine::full_kl_fwd`), no [N, V] temporaries.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.ops._library import accum_dtype, float_dtype_check, load_library

load_library()
_ops = torch.ops.rlhf_engine

KINDS = {"kl": 0, "abs": 1, "mse": 2, "k3": 3}


@torch.library.register_fake("rlhf_engine::token_kl_fwd")
def _token_kl_fwd_fake(logp, ref_logp, kind):
    return torch.empty_like(logp)


@torch.library.register_fake("rlhf_engine::token_kl_bwd")
def _token_kl_bwd_fake(grad, logp, ref_logp, kind):
    return torch.empty_like(logp), torch.empty_like(logp)


def _token_kl_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _token_kl_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    g_logp, g_ref = _ops.token_kl_bwd(grad.contiguous(), logp, ref_logp, ctx.kind)
    return g_logp, g_ref, None


torch.library.register_autograd("rlhf_engine::token_kl_fwd", _token_kl_backward, setup_context=_token_kl_setup)


@torch.library.register_fake("rlhf_engine::full_kl_fwd")
def _full_kl_fwd_fake(logits, ref_logits, inv_temperature):
    n = logits.shape[0]
    dt = accum_dtype(logits.dtype)
    return tuple(logits.new_empty(n, dtype=dt) for _ in range(3))


@torch.library.register_fake("rlhf_engine::full_kl_bwd")
def _full_kl_bwd_fake(grad, logits, ref_logits, kl, lse, ref_lse, inv_temperature, ref_grad):
    return torch.empty_like(logits), (torch.empty_like(ref_logits) if ref_grad else logits.new_empty(0))


def _full_kl_setup(ctx, inputs, output):
    logits, ref_logits, inv_temperature = inputs
    kl, lse, ref_lse = output
    ctx.save_for_backward(logits, ref_logits, kl, lse, ref_lse)
    ctx.inv_temperature = inv_temperature
    ctx.mark_non_differentiable(lse, ref_lse)


def _full_kl_backward(ctx, grad, _g_lse, _g_ref_lse):
    logits, ref_logits, kl, lse, ref_lse = ctx.saved_tensors
    ref_grad = bool(ctx.needs_input_grad[1])
    g_logits, g_ref = _ops.full_kl_bwd(
        grad.contiguous(), logits, ref_logits, kl, lse, ref_lse, ctx.inv_temperature, ref_grad
    )
    return g_logits, (g_ref if ref_grad else None), None


torch.library.register_autograd("rlhf_engine::full_kl_fwd", _full_kl_backward, setup_context=_full_kl_setup)


def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} dtype {a.dtype} and {name_b} dtype {b.dtype} must match")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} and {name_b} shape {tuple(b.shape)} must match")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.numel() == 0:
        raise ValueError(f"{name_a} is empty (shape {tuple(a.shape)})")


def _full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if logits.dim() < 1:
        raise ValueError("logits must be [..., V], got a 0-d tensor")
    lead, v = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, v).contiguous()  # [N, V]
    flat_ref = ref_logits.reshape(-1, v).contiguous()  # [N, V]
    kl, _, _ = _ops.full_kl_fwd(flat, flat_ref, 1.0 / float(temperature))
    return kl.reshape(lead)  # [...]


def token_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    kind in kl | abs | mse | k3: logp, ref_logp [...] log-probs of the taken tokens -> [...] (their dtype).
    kind == "full": logp, ref_logp are logits [..., V] -> exact KL(softmax(logp/T) || softmax(ref_logp/T))
    [...] fp32 (fp64 for fp64 logits). mask [...] (bool or 0/1): masked-out positions give exactly 0.
    Differentiable w.r.t. both inputs.
    """
    if kind not in KINDS and kind != "full":
        raise ValueError(f"kind must be one of {sorted([*KINDS, 'full'])}, got {kind!r}")
    float_dtype_check("logp", logp)
    float_dtype_check("ref_logp", ref_logp)
    _check_same("logp", logp, "ref_logp", ref_logp)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kind == "full":
        out = _full_kl(logp, ref_logp, temperature)
    else:
        out = _ops.token_kl_fwd(logp.contiguous(), ref_logp.contiguous(), KINDS[kind])
    if mask is None:
        return out
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != out.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the per-token shape {tuple(out.shape)}")
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))
