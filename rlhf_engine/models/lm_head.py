"""Token log-probs of a causal LM straight from its final hidden states: the [tokens, V] logits never exist.

    with replaced_lm_head(model, head):         # model.lm_head is `head` for this block
        out = model(input_ids, ...).logits      # [..., 2]: (log-prob, entropy) of head.labels

`HiddenLogprobHead` stands in for the model's LM head (an `nn.Linear`) for one forward: it receives the
final hidden states the LM head would have multiplied, keeps the positions that predict a label
(`select`), and runs the chunked `logprobs_from_hidden` op with the LM head's own weight (and bias).
Running inside the model's forward is what makes this work under FSDP2: the weight is gathered by the
forward of the module that owns it, and the backward of the op accumulates into that parameter.

A model may post-process its logits (a soft cap, a logit scale); then its log-probs are not those of
`lm_head(hidden)` and this path must not be used: `plain_lm_head` checks that once per model, by behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from rlhf_engine.data.tokenize import IGNORE_INDEX
from rlhf_engine.ops import logprobs_from_hidden


class HiddenLogprobHead(nn.Module):
    """The log-probs (and entropy) of `labels` from the hidden states an LM head receives.

    lm_head: the model's `nn.Linear` [V, H] head; labels [...] (IGNORE_INDEX: not scored, 0 there);
    select: hidden states as the model hands them to its head ([B, K, H]) -> [..., H] aligned with `labels`.
    forward returns [..., 2] fp32: log-prob and entropy (0 when `with_entropy` is False). Under `torch.autocast`
    the head's matmuls run in the autocast dtype, as the model's `nn.Linear` head would (its weight gradient
    then accumulates over the token chunks in that dtype, `logprobs_from_hidden`); in the weight's dtype otherwise.
    """

    def __init__(self, lm_head: nn.Linear, labels: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor],
                 temperature: float = 1.0, with_entropy: bool = False) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.labels = labels
        self.select = select
        self.temperature = temperature
        self.with_entropy = with_entropy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.select(hidden)  # [..., H]
        if self.labels.numel() == 0:  # no scored token (a micro-batch of dropped samples): zeros on the graph
            return h[..., :2].float() * 0.0
        weight, bias = self.lm_head.weight, self.lm_head.bias
        # the head's matmuls in the dtype an nn.Linear would get (autocast does not reach the custom op)
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        out = logprobs_from_hidden(h.to(dtype), weight.to(dtype), self.labels,
                                   bias=bias.to(dtype) if bias is not None else None,
                                   temperature=self.temperature, ignore_index=IGNORE_INDEX,
                                   return_entropy=self.with_entropy)
        logp, entropy = out if self.with_entropy else (out, torch.zeros_like(out))
        return torch.stack([logp, entropy], dim=-1)  # [..., 2]


class SelectedPositionsHead(nn.Module):
    """The LM head applied only at the positions that predict a label: hidden [B, K, H] -> select -> [..., H] ->
    logits [..., V]. For packed rows, whose forward would otherwise run the head on every position (prompt
    tokens included: about twice the response tokens when prompts and responses are equally long)."""

    def __init__(self, lm_head: nn.Module, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.select = select

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.select(hidden))


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute) that hold `model`'s output embeddings (`lm_head` of transformers' causal LMs,
    found anywhere below `model`, e.g. inside a PEFT wrapper)."""
    head = model.get_output_embeddings()
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                return parent, name
    raise TypeError(f"{type(model).__name__}: its output embeddings are not a submodule of it")


@contextlib.contextmanager
def replaced_lm_head(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Make `head` the LM head of the causal LM `model` for the block (the original is put back after)."""
    parent, name = _head_slot(model)
    original = getattr(parent, name)
    setattr(parent, name, head)
    try:
        yield
    finally:
        setattr(parent, name, original)


@torch.no_grad()
def plain_lm_head(model: nn.Module) -> bool:
    """Whether `model`'s logits are exactly `lm_head(final hidden states)` with an `nn.Linear` head: probed once
    on a 4-token input by comparing the model's logits with the head applied to what the head received."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return False
    received: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: received.append(args[0]))
    try:
        device = head.weight.device
        logits = model(input_ids=torch.tensor([[4, 5, 6, 7]], device=device), use_cache=False).logits
    finally:
        hook.remove()
    return len(received) == 1 and torch.equal(logits, head(received[0]).to(logits.dtype))


def check_plain_lm_head(model: nn.Module, setting: str) -> None:
    """ValueError naming `setting` when `model` post-processes its logits (see `plain_lm_head`)."""
    if not plain_lm_head(model):
        raise ValueError(
            f"{setting}: {type(model).__name__} does not produce its logits as a plain linear LM head of its final "
            "hidden states (a logit soft cap or scale, or another head type), so its log-probs cannot be computed "
            f"from the hidden states; set {setting} to false"
        )


def next_token_logprobs_from_hidden(model: nn.Module, inputs: dict[str, torch.Tensor],
                                    labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each labelled token t under the causal LM's prediction at position t - 1, from the hidden
    states (no logits): `model(**inputs)` with labels [B, T] (IGNORE_INDEX: not scored) -> [B, T - 1] fp32,
    0 where ignored. The SFT loss and DPO's sequence log-probs with `logprobs_from_hidden`."""
    head = HiddenLogprobHead(model.get_output_embeddings(), labels[:, 1:], lambda hidden: hidden[:, :-1])
    with replaced_lm_head(model, head):
        out = model(**inputs, use_cache=False).logits  # [B, T - 1, 2]
    return out[..., 0]
