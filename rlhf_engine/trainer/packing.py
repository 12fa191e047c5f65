"""Packed forward passes: the (query, response) pairs of a micro-batch concatenated into one row without
padding, for the policy, value, reference and reward passes of PPO.

    input_ids    [1, L] = q_0 r_0 q_1 r_1 ...        (L = sum of the real tokens, no padding)
    position_ids [1, L] = 0 1 .. 0 1 ..               (restart at every sequence)

No attention mask is passed: transformers (5.x) then derives a block-diagonal causal mask from the
position restarts (eager, sdpa, flex attention; flash-attention uses them as varlen boundaries), so no
token attends across sequences. That path is only taken without a KV cache: every packed call passes
`use_cache=False` (with a cache, transformers ignores the restarts and the sequences see each other).

The model computes logits (and values) only at the N positions that predict a response token
(`logits_to_keep` given as an index tensor), in the order of the rows and then of the tokens, which is
the order of `response_mask.bool()`; `unpack` scatters such [1, N, ...] outputs back to the padded
[B, T, ...] layout of the experience.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedBatch:
    """One micro-batch of B (query, response) pairs as one packed row (see the module docstring)."""

    input_ids: torch.Tensor  # [1, L] int64
    position_ids: torch.Tensor  # [1, L] int64, restarting at 0 for every sequence
    predict_index: torch.Tensor  # [N] int64: the column of [1, L] whose output predicts each response token
    labels: torch.Tensor  # [1, N] int64: the response tokens, row after row
    last_index: torch.Tensor  # [B] int64: the column of each sequence's last token (reward-model pooling)
    response_mask: torch.Tensor  # [B, T] bool: where the N packed response tokens go back to

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...] with 0 on padding (differentiable)."""
        out = packed.new_zeros(*self.response_mask.shape, *packed.shape[2:])  # [B, T, ...]
        out[self.response_mask] = packed[0]
        return out


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              query_width: int, response_mask: torch.Tensor) -> PackedBatch:
    """Pack a padded batch laid out as [left-padded queries | right-padded responses].

    input_ids, attention_mask, position_ids [B, Lq + T] (position 0 at each query's first real token);
    query_width Lq; response_mask [B, T] (1 on the tokens up to and including EOS).
    """
    response_mask = response_mask.bool()
    keep = torch.cat([attention_mask[:, :query_width].bool(), response_mask], dim=1)  # [B, Lq + T]
    # column of every kept token in the packed row: running count of kept tokens, row-major
    packed_col = keep.reshape(-1).cumsum(0).reshape(keep.shape) - 1  # [B, Lq + T]
    response_cols = packed_col[:, query_width:][response_mask]  # [N]
    lengths = keep.sum(dim=1)  # [B]
    return PackedBatch(
        input_ids=input_ids[keep][None],
        position_ids=position_ids[keep][None],
        predict_index=response_cols - 1,  # the token before each response token predicts it
        labels=input_ids[:, query_width:][response_mask][None],
        last_index=lengths.cumsum(0) - 1,
        response_mask=response_mask,
    )


@dataclass(frozen=True)
class PassLayout:
    """Which forward passes run packed (True) or padded (False), decided once per trainer."""

    policy: bool = False
    ref: bool = False
    critic: bool = False
    reward: bool = False


class PackingSupport:
    """Whether a model honours packed `position_ids` (checked once per model, by behaviour), with a one-time
    warning per model class that falls back to padding. Owned by one trainer: no process-level state."""

    def __init__(self) -> None:
        self._checked: dict[int, bool] = {}
        self._warned: set[str] = set()

    def __call__(self, model: nn.Module) -> bool:
        key = id(model)
        if key not in self._checked:
            ok = _accepts_position_ids(model) and _packing_isolates(model)
            self._checked[key] = ok
            name = type(model).__name__
            if not ok and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"{name} does not support packed sequences (position_ids that restart per "
                              "sequence without an attention mask); its forward passes fall back to padding",
                              RuntimeWarning, stacklevel=3)
        return self._checked[key]


def _accepts_position_ids(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params


@torch.no_grad()
def _packing_isolates(model: nn.Module) -> bool:
    """Probe: the output at token c of the packed row [a b | c] must equal that of [c] alone."""
    device = next(model.parameters()).device
    ids = torch.tensor([[4, 5, 6]], device=device)  # no special (pad) token: classifiers pool at the last non-pad
    alone = model(input_ids=ids[:, 2:], position_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
                  use_cache=False).logits[0, -1]
    packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 0]], device=device), use_cache=False).logits[0, -1]
    return bool(torch.allclose(alone.float(), packed.float(), rtol=1e-3, atol=1e-3))


@torch.no_grad()
def packed_scores(reward_model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Scores [B] fp32 of a one-label sequence classifier (transformers' `*ForSequenceClassification`: a
    `base_model` and a `score` head) over a packed row: the head reads each sequence's last token, where the
    padded classifier pools."""
    hidden = reward_model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                     use_cache=False).last_hidden_state  # [1, L, H]
    return reward_model.score(hidden[0, packed.last_index])[:, 0].float()  # [B]


def pass_layout(packing: bool, policy: nn.Module, ref_model: nn.Module, critic: nn.Module | None,
                 reward_model: nn.Module | None) -> PassLayout:
    """Which passes run packed: all when `packing` and each model supports it (`PackingSupport`).
    policy, ref_model: causal LMs; critic: an `AutoModelForCausalLMWithValueHead`; reward_model: a
    sequence classifier (packed only with a `score` head, see `packed_scores`)."""
    if not packing:
        return PassLayout()
    supports = PackingSupport()
    return PassLayout(
        policy=supports(policy),
        ref=supports(ref_model),
        critic=critic is not None and supports(critic.pretrained_model),
        reward=reward_model is not None and hasattr(reward_model, "score") and supports(reward_model),
    )
