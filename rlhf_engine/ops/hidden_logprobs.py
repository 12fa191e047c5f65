"""Log-probs (and entropy) of labels straight from hidden states: `logprobs_from_hidden`.

    logits = hidden @ weight.T + bias           [N, V]   (the LM head)
    logprob[n] = log_softmax(logits[n] / T)[labels[n]]

is computed chunk by chunk over the tokens: only one chunk's logits [chunk_tokens, V] exist at a
time, and the fused log-prob/entropy kernel (`rlhf_engine::logprobs_fwd`) runs on each chunk.
The backward recomputes each chunk's logits, turns them into grad_logits in place
(`rlhf_engine::logprobs_bwd_inplace`) and accumulates grad_hidden, grad_weight and grad_bias
chunk by chunk. The cost: the backward multiplies by the weight three times (recompute,
grad_hidden, grad_weight) where an eager LM head that keeps its logits multiplies twice.
"""

from __future__ import annotations

import math
import sys

import torch

from rlhf_engine.ops._library import (
    accum_dtype,
    check_labels_in_range,
    check_tensor_device,
    cuda_kernels_built,
    load_library,
)

load_library()
_ops = torch.ops.rlhf_engine
_CUDA_BUILT = cuda_kernels_built()  # read once: torch.compile traces the checks below

DEFAULT_CHUNK_TOKENS = 1024
# Default chunk: as many tokens as keep one chunk's logits near 128 MiB, within [16, 1024]. Each
# chunk's matmul reads the whole weight [V, H]: fewer, larger chunks read it fewer times (at
# V = 151936 fp32, 64 MiB chunks of 110 tokens made the forward 1.8x slower than eager on
# the 2-core CPU; 128 MiB keeps a chunk's logits under 1/8 of the eager peak at the benchmark shapes).
_CHUNK_LOGIT_BYTES = 128 << 20


def default_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk whose logits [chunk, V] take about 128 MiB (at least 16, at most 1024)."""
    per_token = vocab * torch.empty((), dtype=dtype).element_size()
    return max(16, min(DEFAULT_CHUNK_TOKENS, _CHUNK_LOGIT_BYTES // per_token))


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor
) -> torch.Tensor:
    """hidden [c, H] @ weight.T [H, V] (+ bias [V]) -> logits [c, V] in the inputs' dtype, written
    into the first c rows of buf [chunk, V] (one buffer for all chunks: no allocation per chunk)."""
    out = buf[: hidden.shape[0]]  # [c, V]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


@torch.library.custom_op("rlhf_engine::hidden_logprobs_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _hidden_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, entropy, lse) [N] of hidden [N, H], weight [V, H], labels [N], chunked over N."""
    n = hidden.shape[0]
    check_labels_in_range(labels, weight.shape[0], ignore_index)  # one device sync on CUDA
    dt = accum_dtype(hidden.dtype)
    logprob = hidden.new_empty(n, dtype=dt)
    entropy = hidden.new_empty(n, dtype=dt)
    lse = hidden.new_empty(n, dtype=dt)
    buf = hidden.new_empty(min(chunk_tokens, n), weight.shape[0])  # [chunk, V]
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        logits = _chunk_logits(hidden[s:e], weight, bias, buf)  # [c, V]
        lp, ent, ls = _ops.logprobs_fwd(logits, labels[s:e], inv_temperature, ignore_index, with_entropy)
        logprob[s:e], entropy[s:e], lse[s:e] = lp, ent, ls
    return logprob, entropy, lse


@_hidden_logprobs_fwd.register_fake
def _hidden_logprobs_fwd_fake(hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, chunk_tokens):
    n = hidden.shape[0]
    dt = accum_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt)


@torch.library.custom_op("rlhf_engine::hidden_logprobs_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def _hidden_logprobs_bwd(
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]); an unneeded one is an empty tensor.

    grad_entropy may be empty (the entropy output had no gradient). Per chunk c:
        G_c = d loss / d logits_c      (the logits kernel's backward, written over logits_c)
        grad_hidden[c] = G_c @ weight ; grad_weight += G_c.T @ hidden[c] ; grad_bias += sum_rows G_c
    grad_weight accumulates in the weight's dtype (one rounding per chunk in bf16).
    """
    n = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
    bias_acc = torch.zeros(weight.shape[0], dtype=accum_dtype(weight.dtype), device=weight.device) if need_bias else None
    buf = hidden.new_empty(min(chunk_tokens, n), weight.shape[0])  # [chunk, V]
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        grads = _chunk_logits(hidden[s:e], weight, bias, buf)  # [c, V] logits, overwritten with G_c below
        g_ent = grad_entropy[s:e] if grad_entropy.numel() else grad_entropy
        _ops.logprobs_bwd_inplace(
            grad_logprob[s:e], g_ent, grads, labels[s:e], lse[s:e], entropy[s:e], inv_temperature, ignore_index
        )
        if need_hidden:
            torch.mm(grads, weight, out=grad_hidden[s:e])  # [c, V] @ [V, H]
        if need_weight:
            grad_weight.addmm_(grads.t(), hidden[s:e])  # += [V, c] @ [c, H]
        if bias_acc is not None:
            bias_acc += grads.sum(0, dtype=bias_acc.dtype)  # [V]
    grad_bias = bias_acc.to(weight.dtype) if bias_acc is not None else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@_hidden_logprobs_bwd.register_fake
def _hidden_logprobs_bwd_fake(
    grad_logprob, grad_entropy, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
    chunk_tokens, need_hidden, need_weight, need_bias,
):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, chunk_tokens = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy, chunk_tokens)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, chunk_tokens = ctx.args
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_logprob = torch.zeros_like(lse) if grad_logprob is None else grad_logprob.contiguous()
    if grad_entropy is None or not with_entropy:
        grad_entropy = lse.new_empty(0)  # the kernel skips the entropy term
    else:
        grad_entropy = grad_entropy.contiguous()
    gh, gw, gb = _hidden_logprobs_bwd(
        grad_logprob, grad_entropy, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
        chunk_tokens, need_hidden, need_weight, need_bias and bias is not None,
    )
    return (
        gh if need_hidden else None,
        gw if need_weight else None,
        gb if need_bias and bias is not None else None,
        None, None, None, None, None,
    )


torch.library.register_autograd("rlhf_engine::hidden_logprobs_fwd", _backward, setup_context=_setup_context)


def _reject_dtensor(name: str, t: torch.Tensor) -> None:
    # A DTensor exists only once its module is imported: look it up instead of importing it (slow).
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is not None:
        if isinstance(t, dtensor_module.DTensor):
            raise TypeError(
                f"{name} is a DTensor (placements {t.placements}): gather it first (FSDP2: call from inside "
                "the LM head module's forward, or lm_head.unshard()), or pass t.full_tensor()"
            )


def _validate(hidden, weight, labels, bias, temperature, chunk_tokens) -> None:
    """Shape, dtype and device checks at op entry (the label range is checked by the op itself)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head weight [V, H], got shape {tuple(weight.shape)}")
    v, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(
            f"hidden has H = {hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight [V, H] has "
            f"H = {h} (shape {tuple(weight.shape)})"
        )
    if v == 0 or h == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} and labels shape {tuple(labels.shape)} do not line up: "
            "expected hidden [..., H] with labels [...]"
        )
    if labels.numel() == 0:
        raise ValueError(f"hidden/labels are empty (labels shape {tuple(labels.shape)})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (v,) or bias.dtype != hidden.dtype:
            got = f"shape {tuple(bias.shape)}, {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a [{v}] tensor of {hidden.dtype} (V of weight), got {got}")
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None:
            _reject_dtensor(name, t)
            check_tensor_device(name, t, _CUDA_BUILT)
            if t.device != hidden.device:
                raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0):
        raise ValueError(f"chunk_tokens must be a positive int (tokens per chunk), got {chunk_tokens!r}")


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature).

    hidden: [..., H] (usually [N, H] or [B, T, H]); weight: the LM head [V, H] (it may be tied to
    the input embedding: the gradients of both uses add up); labels: [...] integer in [0, V) or
    ignore_index; bias: [V] or None. fp32, bf16, fp16, fp64; hidden, weight and bias share a dtype.
    Returns logprob [...] fp32 (fp64 for fp64), and entropy [...] when return_entropy, exactly as
    `logprobs_from_logits(hidden @ weight.T + bias, labels, ...)` up to the rounding of the logits
    (computed in the inputs' dtype, as an eager LM head does). Ignored positions give 0 and no
    gradient. Differentiable w.r.t. hidden, weight and bias.

    Memory: the [N, V] logits are never materialized; one chunk's logits [chunk_tokens, V] exist
    at a time, in the forward and again (recomputed) in the backward. chunk_tokens=None picks
    about 128 MiB of logits per chunk (default_chunk_tokens).
    Labels: a label outside [0, V) that is not ignore_index raises IndexError on every device,
    checked once at op entry (on CUDA this costs one device sync).
    FSDP2: the LM head weight must be unsharded when this runs. Under `fully_shard` its module's
    forward gathers it, so call this from inside that module's forward (e.g. a wrapper module
    around the LM head) or gather it explicitly (`lm_head.unshard()` / `summon_full_params`);
    a sharded DTensor weight is rejected (it is not a plain tensor of shape [V, H] on one device).
    """
    _validate(hidden, weight, labels, bias, temperature, chunk_tokens)
    lead = labels.shape  # [...]
    h = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, h).contiguous()  # [N, H]
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()  # [N]
    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(weight.shape[0], hidden.dtype)
    logprob, entropy, _ = _hidden_logprobs_fwd(
        flat_hidden, weight, bias, flat_labels, 1.0 / float(temperature), int(ignore_index), bool(return_entropy), chunk
    )
    if return_entropy:
        return logprob.reshape(lead), entropy.reshape(lead)
    return logprob.reshape(lead)
