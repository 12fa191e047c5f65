"""Packed rows in which the samples of one query share it: the query's tokens run once, each response
attends to them and to its own earlier tokens, never to another response (GRPO groups, several samples per
prompt).

    input_ids    [R, W] = q r_0 r_1 r_2 r_3 | q' r_4 ..        (one unit: a query and its responses)
    position_ids [R, W] = 0 .. P-1 P .. P .. P .. P ..        (each response continues the query's positions)
    mask       [R, 1, W, W]: token i sees token j <= i of its unit when j is in the query or in i's response

A sample's output equals the one of its own (query, response) sequence: the same tokens at the same positions
under the same causal visibility. What it saves is the query's trunk FLOPs for every sample of a group but
the first: (k - 1) x P tokens per group of k. The price is attention: the mask-based kernels work on the
full W x W square of a row, and units of whole groups make wider rows (and, first-fit into rows, maybe longer
tails) than single samples. `pack_cheaper` therefore plans a micro-batch both ways and runs the layout of
fewer estimated FLOPs: a row of W positions costs W x (A + W), where A, the model's `attention_width`, is the
number of attention pairs that cost as much as one token's matmuls (2 x params per layer / (4 x attention
width): 4096 for the 38 M Llama of the benchmarks, about 25 k for 7 B-class models). A unit is cut into
several, each repeating the query, at the longest single sample (rows no wider than without sharing) or at
A / 4 tokens (attention then costs at most a quarter of the matmuls), whichever is cheaper.
The first response token of each sample is predicted by the query's last token (shared); the others by their
predecessor in the response.

Models take the mask as a custom 4D boolean attention mask (transformers' sdpa attention; checked once per
model by behaviour, see `shares_prompts`); flash-attention's varlen kernels cannot express it.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_engine.trainer.passes.packing import PackedBatch, first_fit_decreasing, isolates, pack_rows


def attention_width(model: nn.Module) -> int:
    """A: how many attention pairs (query x key positions) cost the FLOPs of one token through a decoder
    layer's matmuls, 2 x params per layer / (4 x heads x head_dim), from a transformers config; 0 when the
    model does not say (then queries are never shared)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None and getattr(m, "weight", None) is not None}
    per_layer = sum(p.numel() for p in model.parameters() if id(p) not in embeddings) / layers
    return int(2 * per_layer / (4 * heads * head_dim))


def row_cost(rows: int, width: int, attention_width: int) -> int:
    """Estimated FLOPs of `rows` packed rows of `width` positions, in units of one attention pair:
    R x W x (A + W)."""
    return rows * width * (attention_width + width)


def pack_cheaper(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 query_width: int, response_mask: torch.Tensor, attention_width: int) -> PackedBatch:
    """A packed batch (the arguments of `packing.pack_rows`), with each group's query shared when `row_cost`
    says that is cheaper than one query per sample. Shared units are cut at the longest sample (rows no wider
    than without sharing) or at `attention_width` / 4 tokens, whichever costs less; the layouts are planned on
    the host from the lengths, only the chosen one is built."""
    response_mask, query_mask, q_len, r_len, groups = _plan_inputs(input_ids, attention_mask, query_width,
                                                                   response_mask)
    lengths = [q + r for q, r in zip(q_len, r_len)]
    _, ends = first_fit_decreasing(lengths, max(lengths))
    best, best_cost = None, row_cost(len(ends), max(lengths), attention_width)
    if len(set(groups)) < len(groups):
        for cap in sorted({max(lengths), max(max(lengths), attention_width // 4)}):
            plan = _SharedPlan(groups, q_len, r_len, cap)
            cost = row_cost(plan.rows, plan.width, attention_width)
            if len(plan.units) < len(lengths) and cost < best_cost:
                best, best_cost = plan, cost
    if best is None:
        return pack_rows(input_ids, attention_mask, position_ids, query_width, response_mask)
    return best.build(input_ids, position_ids, query_width, query_mask, response_mask)


def _plan_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, query_width: int,
                 response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], list[int]]:
    """(response mask [B, T] bool, query mask [B, Lq] bool, query lengths, response lengths, query groups):
    what a layout is planned from, on the host (device syncs)."""
    response_mask = response_mask.bool()
    query_mask = attention_mask[:, :query_width].bool()
    groups = query_groups(input_ids[:, :query_width], query_mask)
    return response_mask, query_mask, query_mask.sum(dim=1).tolist(), response_mask.sum(dim=1).tolist(), groups


class _SharedPlan:
    """Where each sample's query and response go in the shared rows: units (a group's samples, cut past `cap`
    tokens) placed first-fit-decreasing into rows as wide as the longest unit."""

    def __init__(self, groups: list[int], q_len: list[int], r_len: list[int], cap: int) -> None:
        self.q_len, self.r_len = q_len, r_len
        self.units = _units(groups, q_len, r_len, cap)
        unit_len = [q_len[u[0]] + sum(r_len[i] for i in u) for u in self.units]
        self.width = max(unit_len)
        self.unit_start, row_ends = first_fit_decreasing(unit_len, self.width)
        self.rows = len(row_ends)

    def build(self, input_ids: torch.Tensor, position_ids: torch.Tensor, query_width: int,
              query_mask: torch.Tensor, response_mask: torch.Tensor) -> PackedBatch:
        device = input_ids.device
        q_len, r_len, units, rows, width = self.q_len, self.r_len, self.units, self.rows, self.width
        # per sample: the flat start of its unit's query and of its response; the query is read from the unit's
        # first sample
        q_start, r_start, sample_unit = [0] * len(q_len), [0] * len(q_len), [0] * len(q_len)
        for u, samples in enumerate(units):
            at = self.unit_start[u] + q_len[samples[0]]
            for i in samples:
                q_start[i], r_start[i], sample_unit[i] = self.unit_start[u], at, u
                at += r_len[i]
        q_start_t = torch.tensor(q_start, device=device)
        r_start_t = torch.tensor(r_start, device=device)
        lead = torch.tensor([samples[0] for samples in units], device=device)
        q_valid = query_mask[lead]  # [U, Lq]
        q_flat = q_start_t[lead, None] + q_valid.cumsum(dim=1) - 1  # [U, Lq], valid where q_valid
        r_flat = r_start_t[:, None] + response_mask.cumsum(dim=1) - 1  # [B, T], valid where response_mask

        grid_ids = torch.zeros(rows * width, dtype=input_ids.dtype, device=device)
        grid_pos = torch.zeros_like(grid_ids)
        unit_of = torch.arange(-rows * width, 0, device=device)  # the tails: every token a unit of its own
        branch_of = torch.full((rows * width,), -1, device=device)  # -1: a query token; else the sample's index
        queries = q_flat[q_valid]
        grid_ids[queries] = input_ids[lead, :query_width][q_valid]
        grid_pos[queries] = position_ids[lead, :query_width][q_valid]
        unit_of[queries] = torch.arange(len(units), device=device)[:, None].expand_as(q_flat)[q_valid]
        responses = r_flat[response_mask]  # [N] flat positions of the response tokens, sample after sample
        sample_ids = torch.arange(len(q_len), device=device)[:, None].expand_as(r_flat)[response_mask]  # [N]
        grid_ids[responses] = input_ids[:, query_width:][response_mask]
        grid_pos[responses] = position_ids[:, query_width:][response_mask]
        unit_of[responses] = torch.tensor(sample_unit, device=device)[sample_ids]
        branch_of[responses] = sample_ids

        query_last = q_start_t + torch.tensor(q_len, device=device) - 1  # [B] flat position of each query's end
        first = torch.zeros_like(response_mask)  # each sample's first response token: predicted by the query's end
        first[:, 0] = response_mask[:, 0]
        predict = r_flat - 1
        predict[first] = query_last[first[:, 0]]
        r_len_t = torch.tensor(r_len, device=device)
        return PackedBatch(
            input_ids=grid_ids.reshape(rows, width),
            position_ids=grid_pos.reshape(rows, width),
            predict_index=predict[response_mask],
            labels=input_ids[:, query_width:][response_mask][None],
            last_index=torch.where(r_len_t > 0, r_start_t + r_len_t - 1, query_last),
            response_mask=response_mask,
            attention_mask=_visibility(unit_of.reshape(rows, width), branch_of.reshape(rows, width)),
        )


def query_groups(query_ids: torch.Tensor, query_mask: torch.Tensor) -> list[int]:
    """Group index of each of B samples: equal for samples whose real query tokens are equal.
    query_ids, query_mask [B, Lq] (left-padded). One device sync."""
    keyed = query_ids.masked_fill(~query_mask.bool(), -1)
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    return inverse.tolist()


def _units(groups: list[int], q_len: list[int], r_len: list[int], cap: int) -> list[list[int]]:
    """The samples of each group (in order of first appearance), cut into units of at most `cap` tokens
    (query once + responses); every unit holds at least one sample."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units: list[list[int]] = []
    for samples in members.values():
        unit: list[int] = []
        used = q_len[samples[0]]
        for i in samples:
            if unit and used + r_len[i] > cap:
                units.append(unit)
                unit, used = [], q_len[i]
            unit.append(i)
            used += r_len[i]
        units.append(unit)
    return units


def _visibility(unit_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """[R, 1, W, W] bool: token i sees token j <= i of its own unit when j is a query token (branch -1) or in
    i's own response."""
    width = unit_of.shape[1]
    position = torch.arange(width, device=unit_of.device)
    causal = position[None, :] <= position[:, None]  # [W, W]: [i, j]
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]
    key_branch = branch_of[:, None, :]
    visible = causal & same_unit & ((key_branch == -1) | (key_branch == branch_of[:, :, None]))
    return visible[:, None]


def shares_prompts(model: nn.Module) -> bool:
    """Probe: in the shared row [q0 q1 | a b | c] (one query, responses `a b` and `c`), the output at `c` equals
    that of the sequence [q0 q1 c] alone: the model honours a custom 4D boolean attention mask."""
    branch = torch.tensor([[-1, -1, 0, 0, 1]], device=next(model.parameters()).device)
    return isolates(model, [4, 5, 6, 7, 8], [0, 1, 2, 3, 2], alone=[0, 1, 4],
                    attention_mask=_visibility(torch.zeros_like(branch), branch))
