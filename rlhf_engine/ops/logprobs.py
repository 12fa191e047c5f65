"""Fused log-softmax + gather (+ entropy): `logprobs_from_logits`.

The kernel (`rlhf_engine::logprobs_fwd`) reads each row of logits once with an online
max / sum-exp and never writes an [N, V] intermediate; the backward recomputes the softmax
from the saved log-sum-exp in one pass.
"""

from __future__ import annotations

import math

import torch

from rlhf_engine.ops._library import accum_dtype, check_labels_in_range, float_dtype_check, load_library

load_library()
_ops = torch.ops.rlhf_engine


@torch.library.register_fake("rlhf_engine::logprobs_fwd")
def _logprobs_fwd_fake(logits, labels, inv_temperature, ignore_index, with_entropy):
    n = logits.shape[0]
    dt = accum_dtype(logits.dtype)
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt)


@torch.library.register_fake("rlhf_engine::logprobs_bwd")
def _logprobs_bwd_fake(grad_logprob, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake("rlhf_engine::logprobs_bwd_inplace")
def _logprobs_bwd_inplace_fake(grad_logprob, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logprob = torch.zeros_like(lse) if grad_logprob is None else grad_logprob.contiguous()
    if grad_entropy is None or not ctx.with_entropy:
        grad_entropy = lse.new_empty(0)  # the kernel skips the entropy term
    else:
        grad_entropy = grad_entropy.contiguous()
    grad_logits = _ops.logprobs_bwd(
        grad_logprob, grad_entropy, logits, labels, lse, entropy, ctx.inv_temperature, ctx.ignore_index
    )
    return grad_logits, None, None, None, None


torch.library.register_autograd("rlhf_engine::logprobs_fwd", _backward, setup_context=_setup_context)


def _validate(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    float_dtype_check("logits", logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension [..., V], got a 0-d tensor")
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and labels shape {tuple(labels.shape)} do not line up: "
            "expected logits [..., V] with labels [...]"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has an empty vocabulary dimension (shape {tuple(logits.shape)})")
    if labels.numel() == 0:
        raise ValueError(f"logits/labels are empty (labels shape {tuple(labels.shape)})")
    if logits.device != labels.device:
        raise ValueError(f"logits is on {logits.device} but labels is on {labels.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(logits / temperature), fused.

    logits: [..., V] fp32 / bf16 / fp16 / fp64; labels: [...] integer, in [0, V) or ignore_index.
    Returns logprob [...] fp32 (fp64 for fp64 logits), and entropy [...] when return_entropy:
        logprob = z[label] - logsumexp(z), entropy = -sum softmax(z) * log_softmax(z), z = logits / T.
    Positions whose label == ignore_index give 0 and no gradient. Differentiable w.r.t. logits.
    A label outside [0, V) that is not ignore_index raises IndexError on every device, checked
    once here at op entry (one reduction; a device sync on CUDA). Under torch.compile this entry
    check is not traced: the CPU kernel still raises, the CUDA kernel gives a NaN log-prob.
    """
    _validate(logits, labels, temperature)
    lead = labels.shape  # [...]
    v = logits.shape[-1]
    flat_logits = logits.reshape(-1, v).contiguous()  # [N, V], a copy only when not already contiguous
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()  # [N]
    if not torch.compiler.is_compiling():
        check_labels_in_range(flat_labels, v, ignore_index)
    args = (flat_logits, flat_labels, 1.0 / float(temperature), int(ignore_index), bool(return_entropy))
    logprob, entropy, _ = _ops.logprobs_fwd(*args)
    if return_entropy:
        return logprob.reshape(lead), entropy.reshape(lead)
    return logprob.reshape(lead)
