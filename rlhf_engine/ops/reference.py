"""Plain-PyTorch references of the kernels (the tests and the benchmark compare against these).

They materialize [N, V] intermediates and loop in Python where the kernels do not: clarity over speed.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob [...], entropy [...]) of logits [..., V] at labels [...], in fp32 (fp64 for fp64)."""
    logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)  # [..., V]
    valid = labels != ignore_index  # [...]
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)  # [...]
    ent = -(logp.exp() * logp).sum(-1)  # [...]
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def logprobs_from_hidden_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager LM head then logprobs_reference: logits = hidden @ weight.T + bias, [..., V] in the
    inputs' dtype (as a model computes them), then (logprob [...], entropy [...]) in fp32 (fp64)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [..., V]
    return logprobs_reference(logits, labels, temperature, ignore_index)


def token_kl_reference(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator, d = logp - ref_logp: kl d, abs |d|, mse d^2 / 2, k3 exp(-d) + d - 1."""
    d = logp - ref_logp
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"unknown kind {kind!r}")


def full_kl_reference(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(logits/T) || softmax(ref_logits/T)) over the last dim: [..., V] -> [...]."""
    logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)  # [..., V]
    logq = torch.log_softmax(_acc(ref_logits) / temperature, dim=-1)  # [..., V]
    return (logp.exp() * (logp - logq)).sum(-1)


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked GAE as a torch loop over T, vectorized over B: [B, T] -> (advantages, returns) [B, T].

    Masked positions give 0 and carry (next value, next advantage) over unchanged.
    """
    r, v, m = _acc(rewards), _acc(values), mask.bool()
    b, t_len = r.shape
    next_v = torch.zeros(b, dtype=r.dtype)
    next_a = torch.zeros(b, dtype=r.dtype)
    adv = torch.zeros_like(r)
    for t in reversed(range(t_len)):
        delta = r[:, t] + gamma * next_v - v[:, t]  # delta_t = r_t + gamma * V_{t+1} - V_t
        a = delta + gamma * lam * next_a  # A_t = delta_t + gamma * lam * A_{t+1}
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, torch.zeros((), dtype=r.dtype))
        next_a = torch.where(valid, a, next_a)
        next_v = torch.where(valid, v[:, t], next_v)
    returns = torch.where(m, adv + v, torch.zeros((), dtype=r.dtype))
    return adv, returns
