"""Batches of tokenized examples: padding (right for training, left for generation), or packing
several sequences into one row.

Packed rows carry `position_ids` that restart at 0 for every sequence and **no** attention mask:
transformers (>= 4.56) then derives a block-diagonal causal mask from the restarts (eager, sdpa and
flex attention; flash-attention uses the same restarts as its varlen boundaries), so no token
attends across sequences and the packed loss equals the unpacked one. The first label of every
packed sequence is set to -100: unpacked, the first token is never predicted, and packed it must
not be predicted from the previous sequence's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_engine.data.tokenize import IGNORE_INDEX, TokenizedPair, TokenizedSFT


@dataclass(frozen=True)
class PackedRow:
    """Several SFT sequences concatenated; `position_ids` restart at 0 at each sequence start."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pad_sequences(seqs: Sequence[Sequence[int] | torch.Tensor], value: int, *,
                  side: Literal["right", "left"] = "right") -> torch.Tensor:
    """Pad integer sequences (lists or 1-D tensors) to one `[B, T]` long tensor, T = the longest,
    with `value` on the `side` given."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        else:
            out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
    return out


def right_pad(seqs: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) int64, padding after each sequence (training batches)."""
    return pad_sequences(seqs, pad_id), _padding_mask([len(s) for s in seqs], "right")


def left_pad(seqs: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, P], attention_mask [B, P]) int64, padding before each sequence, so that every
    sequence ends at the last column (prompts for generation, queries of a PPO batch)."""
    return pad_sequences(seqs, pad_id, side="left"), _padding_mask([len(s) for s in seqs], "left")


def _padding_mask(lengths: list[int], side: Literal["right", "left"]) -> torch.Tensor:
    """[B, max(lengths)] int64: 1 on the tokens, 0 on the padding."""
    n = torch.tensor(lengths, dtype=torch.long)[:, None]  # [B, 1]
    cols = torch.arange(max(lengths))[None, :]  # [1, T]
    return (cols < n if side == "right" else cols >= cols.shape[1] - n).long()


def sft_batch(examples: Sequence[TokenizedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Padded batch: `input_ids`, `attention_mask`, `labels` (-100 on padding), each `[B, T]`."""
    input_ids, attention_mask = right_pad([e.input_ids for e in examples], pad_token_id)
    labels = pad_sequences([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_sequences(examples: Sequence[TokenizedSFT], max_length: int) -> list[PackedRow]:
    """Greedily fill rows of at most `max_length` tokens with whole sequences, in the given order."""
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for e in examples:
        n = len(e.input_ids)
        if n > max_length:
            raise ValueError(f"a sequence of {n} tokens does not fit in a packed row of max_length={max_length}")
        if len(ids) + n > max_length:
            rows.append(PackedRow(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]  # never predict a sequence's first token from its neighbour
        pos += list(range(n))
    if ids:
        rows.append(PackedRow(ids, labels, pos))
    return rows


def packed_batch(rows: Sequence[PackedRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch of packed rows: `input_ids`, `labels`, `position_ids`, each `[B, T]`, and no attention mask
    (see the module docstring). Padding continues the last sequence's positions: it comes after every
    real token, so causality keeps it invisible to them, and its labels are -100."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = pad_sequences([r.input_ids for r in rows], pad_token_id)
    labels = pad_sequences([r.labels for r in rows], IGNORE_INDEX)
    positions = []
    for r in rows:
        last = r.position_ids[-1]
        positions.append(r.position_ids + list(range(last + 1, last + 1 + width - len(r.position_ids))))
    return {"input_ids": input_ids, "labels": labels, "position_ids": pad_sequences(positions, 0)}


def preference_batch(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences then rejected ones in one padded batch: `input_ids`, `attention_mask`,
    `labels` of shape `[2B, T]` (rows 0..B-1 chosen, B..2B-1 rejected) and `margin` `[B]` (0 where absent)."""
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    labels = [p.chosen_labels for p in pairs] + [p.rejected_labels for p in pairs]
    input_ids, attention_mask = right_pad(seqs, pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_sequences(labels, IGNORE_INDEX),
        "margin": torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32),
    }
