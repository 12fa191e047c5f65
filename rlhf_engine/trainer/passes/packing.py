"""Packed forward passes: the (query, response) pairs of a micro-batch concatenated without padding between
them, for the policy, value, reference and reward passes of PPO.

    input_ids    [R, W] = q_0 r_0 q_3 r_3 .. | q_1 r_1 q_2 r_2 ..   (rows of W = the longest sample's tokens)
    position_ids [R, W] = 0 1 .. 0 1 ..      | 0 1 .. 0 1 ..        (restart at every sequence)

The samples fill R rows of width W first-fit-decreasing; only the tail of each row is padding (its
positions continue the row's last sequence, so causality hides it from every real token). Rows rather
than one long row: attention over a row costs W^2, and the mask-based kernels (sdpa and eager on CPUs)
work on the full square of a row, so one row of all L tokens would cost L^2 (measured 8x the attention
time of the padded batch at L = 1184); flash-attention's varlen kernel (GPUs) skips the masked blocks
either way.

No attention mask is passed: transformers (5.x) then derives a block-diagonal causal mask from the
position restarts of each row (eager, sdpa, flex attention; flash-attention uses them as varlen
boundaries), so no token attends across sequences. That path is only taken without a KV cache: every
packed call passes `use_cache=False` (with a cache, transformers ignores the restarts).

Samples that share a query can share it in the rows too (`prompt_sharing`: one copy of the query, a 4D
attention mask); such a `PackedBatch` carries that mask.

Outputs at the N positions that predict a response token are gathered (`gather`, flat indices into
[R * W], in the order of `response_mask.bool()`) and `unpack` scatters such [1, N, ...] tensors back to
the padded [B, T, ...] layout of the experience. The LM head itself runs on those N positions only (the
policy passes gather the hidden states before it: `models.lm_head.SelectedPositionsHead`), not on every
position of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedBatch:
    """One micro-batch of B (query, response) pairs packed into R rows (see the module docstring)."""

    input_ids: torch.Tensor  # [R, W] int64
    position_ids: torch.Tensor  # [R, W] int64, restarting at 0 for every sequence
    predict_index: torch.Tensor  # [N] int64: the flat position in [R * W] whose output predicts each response token
    labels: torch.Tensor  # [1, N] int64: the response tokens, sample after sample
    last_index: torch.Tensor  # [B] int64: the flat position of each sequence's last token (reward-model pooling)
    response_mask: torch.Tensor  # [B, T] bool: where the N packed response tokens go back to
    attention_mask: torch.Tensor | None = None
    """[R, 1, W, W] bool, who sees whom, when the rows share queries (`prompt_sharing`); None: the sequences'
    position restarts say it."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a packed forward pass (`input_ids`, `position_ids`, the mask when any)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def gather(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs [R, W, ...] at the flat positions `index` (default: `predict_index`) -> [1, N, ...]."""
        index = self.predict_index if index is None else index
        return x.reshape(-1, *x.shape[2:])[index][None]

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
    lengths = keep.sum(dim=1).tolist()  # device sync: the layout is planned on the host
    width = max(lengths)
    starts, row_ends = first_fit_decreasing(lengths, width)
    start = torch.tensor(starts, device=keep.device)  # [B] flat offset of each sample in [R * W]
    flat_pos = start[:, None] + keep.cumsum(dim=1) - 1  # [B, Lq + T], valid where keep
    grid_ids = torch.zeros(len(row_ends) * width, dtype=input_ids.dtype, device=keep.device)
    grid_pos = torch.zeros_like(grid_ids)
    grid_ids[flat_pos[keep]] = input_ids[keep]
    grid_pos[flat_pos[keep]] = position_ids[keep]
    for r, (end, last_len) in enumerate(row_ends):  # the tail of a row continues its last sequence
        tail = torch.arange(width - end, device=keep.device)
        grid_pos[r * width + end : (r + 1) * width] = last_len + tail
    response_pos = flat_pos[:, query_width:][response_mask]  # [N]
    return PackedBatch(
        input_ids=grid_ids.reshape(-1, width),
        position_ids=grid_pos.reshape(-1, width),
        predict_index=response_pos - 1,  # the token before each response token predicts it
        labels=input_ids[:, query_width:][response_mask][None],
        last_index=start + torch.tensor(lengths, device=keep.device) - 1,
        response_mask=response_mask,
    )


def first_fit_decreasing(lengths: list[int], width: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Place samples of `lengths` tokens into rows of `width`, longest first, each into the first row with
    room. Returns each sample's flat start (row * width + column) and, per row, (tokens used, length of its
    last sample)."""
    rows: list[list[int]] = []  # [used, last length]
    starts = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        r = next((r for r, (used, _) in enumerate(rows) if used + n <= width), None)
        if r is None:
            rows.append([0, 0])
            r = len(rows) - 1
        starts[i] = r * width + rows[r][0]
        rows[r] = [rows[r][0] + n, n]
    return starts, [(used, last) for used, last in rows]


@torch.no_grad()
def packed_scores(reward_model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Scores [B] fp32 of a one-label sequence classifier (transformers' `*ForSequenceClassification`: a
    `base_model` and a `score` head) over packed rows: the head reads each sequence's last token, where the
    padded classifier pools."""
    hidden = reward_model.base_model(**packed.model_inputs(), use_cache=False).last_hidden_state  # [R, W, H]
    return reward_model.score(packed.gather(hidden, packed.last_index)[0])[:, 0].float()  # [B]


@torch.no_grad()
def isolates(model: nn.Module, ids: list[int], positions: list[int], alone: list[int],
             attention_mask: torch.Tensor | None = None) -> bool:
    """Probe of a layout: the model's output at the last of `ids` (at `positions`, under `attention_mask`)
    must equal that of the tokens at indices `alone` as a sequence of their own, far more closely than the
    output of `ids` as one plain sequence does (a scale that holds for bf16 models too)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)

    def last(input_ids: torch.Tensor, at: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if mask is None else {"attention_mask": mask}
        return model(input_ids=input_ids, position_ids=torch.tensor([at], device=device), use_cache=False,
                     **kwargs).logits[0, -1].float()

    expected = last(tokens[:, alone], list(range(len(alone))))
    err_layout = (last(tokens, positions, attention_mask) - expected).abs().max()
    err_joined = (last(tokens, list(range(len(ids)))) - expected).abs().max()
    return bool(err_layout <= 0.01 * err_joined)

