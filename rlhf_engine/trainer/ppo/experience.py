"""Experience of a PPO step: the padded token batch and the no-grad forward passes that score it.

Layout of a batch of B samples (`rlhf_engine.data.samples.SampleBatch`), one row each:

    input_ids [B, Lp + T] = [ left-padded prompt_ids | right-padded response_ids ]

so every prompt ends at column Lp - 1 and every response starts at column Lp. The logits at columns
Lp - 1 ... Lp + T - 2 predict the T response tokens; the model only computes the last T + 1 positions
(`logits_to_keep`). Per-token tensors of the experience are [B, T] over response tokens, with
`response_mask` 1 up to and including the first EOS and 0 after it (the tokens the passes run over), and
`loss_mask` = `response_mask` and the samples' own loss mask (the tokens trained: every loss, KL, reward,
advantage and statistic is taken over these only; a plain completion's equals `response_mask`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from rlhf_engine.common.dtypes import autocast
from rlhf_engine.data.collate import left_pad, right_pad
from rlhf_engine.data.tokenize import IGNORE_INDEX
from rlhf_engine.distributed.comm import Comm
from rlhf_engine.models.lm_head import HiddenLogprobHead, SelectedPositionsHead, replaced_lm_head
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.ops import logprobs_from_logits
from rlhf_engine.trainer.passes.layout import PassLayout
from rlhf_engine.trainer.passes.packing import PackedBatch, pack_rows
from rlhf_engine.trainer.passes.prompt_sharing import pack_cheaper, query_groups
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.shaping import kl_penalty


@dataclass
class TokenBatch:
    """Prompts and responses side by side (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [B, Lp + T] int64, padding = pad_token_id
    attention_mask: torch.Tensor  # [B, Lp + T] int64
    position_ids: torch.Tensor  # [B, Lp + T] int64, 0 at each prompt's first token
    response_ids: torch.Tensor  # [B, T] int64
    response_mask: torch.Tensor  # [B, T] float32, the response's tokens up to and including EOS
    has_eos: torch.Tensor  # [B] bool
    prompt_width: int  # Lp
    loss_mask: torch.Tensor = field(default=None)  # [B, T] float32, response_mask and the samples' loss mask

    def __post_init__(self) -> None:
        if self.loss_mask is None:  # every token of each response trained
            self.loss_mask = self.response_mask
        if self.loss_mask.shape != self.response_mask.shape:
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} and response_mask "
                             f"{tuple(self.response_mask.shape)} differ in shape")

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def labels(self) -> torch.Tensor:
        """Response ids [B, T] with IGNORE_INDEX on padding, for `logprobs_from_logits`."""
        return self.response_ids.masked_fill(self.response_mask == 0, IGNORE_INDEX)

    def lengths(self) -> list[int]:
        """Real tokens (prompt + response up to EOS) of each row (a device sync)."""
        return self.attention_mask.sum(dim=1).tolist()

    def drop(self, kept: torch.Tensor) -> "TokenBatch":
        """The batch with the samples where `kept` [B] is False left without a valid token (their rows stay)."""
        return replace(self, response_mask=self.response_mask * kept[:, None], loss_mask=self.loss_mask * kept[:, None])

    def pack(self, attention_width: int = 0) -> PackedBatch:
        """The rows as packed rows (`rlhf_engine.trainer.passes.packing`); with `attention_width` > 0 (the model's, see
        `prompt_sharing.attention_width`), the samples of one query share it where that is cheaper
        (`rlhf_engine.trainer.passes.prompt_sharing.pack_cheaper`)."""
        if attention_width:
            return pack_cheaper(self.input_ids, self.attention_mask, self.position_ids, self.prompt_width,
                                self.response_mask, attention_width)
        return pack_rows(self.input_ids, self.attention_mask, self.position_ids, self.prompt_width, self.response_mask)

    def by_prompt(self, rows: list[int]) -> list[int]:
        """`rows` reordered so that rows with equal prompts are adjacent (stable: groups in order of first
        appearance, rows in their order within a group), for micro-batches that share prompts."""
        groups = query_groups(self.input_ids[rows, : self.prompt_width], self.attention_mask[rows, : self.prompt_width])
        first: dict[int, int] = {}
        for i, g in enumerate(groups):
            first.setdefault(g, i)
        return [rows[i] for i in sorted(range(len(rows)), key=lambda i: (first[groups[i]], i))]

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """The sub-batch of `rows`, with columns that are padding in every selected row trimmed off."""
        attention_mask = self.attention_mask[rows]
        response_mask = self.response_mask[rows]
        # device sync: the trimmed widths are read back as Python ints
        lead = int((attention_mask[:, : self.prompt_width] == 0).sum(dim=1).min())
        width = max(1, int(response_mask.sum(dim=1).max()))  # >= 1: rows of only dropped samples still run
        end = self.prompt_width + width
        return replace(
            self,
            input_ids=self.input_ids[rows, lead:end],
            attention_mask=attention_mask[:, lead:end],
            position_ids=self.position_ids[rows, lead:end],
            response_ids=self.response_ids[rows, :width],
            response_mask=response_mask[:, :width],
            loss_mask=self.loss_mask[rows, :width],
            has_eos=self.has_eos[rows],
            prompt_width=self.prompt_width - lead,
        )


def truncate_after_eos(response: torch.Tensor, eos_token_ids: Sequence[int],
                       loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A response [n] cut just after its first end-of-turn token (any of `eos_token_ids`) of its last turn: past
    the last environment token of `loss_mask` [n] (a multi-turn episode's earlier turns end with one too);
    kept as is when there is none."""
    if not eos_token_ids:
        return response
    is_eos = torch.isin(response, torch.tensor(eos_token_ids, dtype=response.dtype))
    if loss_mask is not None and not bool(loss_mask.all()):
        is_eos[: int((~loss_mask).nonzero()[-1, 0]) + 1] = False  # up to the last environment token
    hits = is_eos.nonzero()
    return response if hits.numel() == 0 else response[: int(hits[0, 0]) + 1]


def make_token_batch(
    prompt_ids: list[torch.Tensor],
    response_ids: list[torch.Tensor],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    device: torch.device | str = "cpu",
    loss_mask: list[torch.Tensor] | None = None,
) -> TokenBatch:
    """Pad B prompts (left) and B responses (right, each cut after the first end-of-turn token of its last turn,
    any of `eos_token_ids`, see `truncate_after_eos`) into a `TokenBatch`; `has_eos` marks the responses that end
    with one.

    prompt_ids, response_ids: lists of non-empty 1-D int64 tensors (checked by the caller); loss_mask: B x [R_i]
    bool, the tokens trained (None: every token).
    """
    masks = loss_mask if loss_mask is not None else [None] * len(response_ids)
    responses = [truncate_after_eos(r, eos_token_ids, m) for r, m in zip(response_ids, masks)]
    prompt_pad, prompt_mask = left_pad(prompt_ids, pad_token_id)  # [B, Lp]
    response_pad, response_mask = right_pad(responses, pad_token_id)  # [B, T]
    input_ids = torch.cat([prompt_pad, response_pad], dim=1)  # [B, Lp + T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)  # [B, Lp + T]
    has_eos = torch.tensor([int(r[-1]) in eos_token_ids for r in responses], dtype=torch.bool)
    # positions count from each prompt's first real token; padding gets 0 (it is never attended)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    trained = response_mask.float()  # [B, T]
    if loss_mask is not None:  # the samples' own masks, cut where their responses were cut
        trained = trained * pad_rows([m.float() for m in loss_mask], response_mask.shape[1])
    return TokenBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        response_ids=response_pad.to(device),
        response_mask=response_mask.float().to(device),
        has_eos=has_eos.to(device),
        prompt_width=prompt_pad.shape[1],
        loss_mask=trained.to(device),
    )


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """B 1-D rows -> [B, width] fp32, each cut to `width` and right-padded with 0."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = min(width, row.numel())
        out[i, :n] = row[:n]
    return out


@dataclass
class ForwardOut:
    """Per-token outputs of one forward pass over a `TokenBatch` (all [B, T], logits [B, T, V])."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def forward_policy(
    model: nn.Module,
    batch: TokenBatch,
    temperature: float,
    *,
    with_values: bool = False,
    with_entropy: bool = False,
    keep_logits: bool = False,
    packed: bool = False,
    attention_width: int = 0,
    from_hidden: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> ForwardOut:
    """One pass of a causal LM (or `AutoModelForCausalLMWithValueHead`) over `batch`.

    Log-probs (and entropies) of the response tokens at `temperature` come from the fused
    `logprobs_from_logits` op, never from a full log_softmax; values come from the value head of the same
    pass (`with_values` needs an `AutoModelForCausalLMWithValueHead`). `keep_logits` also returns the
    response logits [B, T, V] as the model produced them (for the `full` KL). `packed`: the rows run as
    packed rows (`rlhf_engine.trainer.passes.packing`; the LM head runs only at the positions that predict a response
    token); the outputs are the same [B, T] tensors as the padded pass. `attention_width` > 0 (with `packed`):
    the samples of one query share its tokens in the packed rows where that is cheaper (`TokenBatch.pack`).
    `from_hidden`: the log-probs come from the final hidden states through `logprobs_from_hidden` inside the
    model's forward (`rlhf_engine.models.lm_head`): no [tokens, V] logits exist (not with `keep_logits`).
    `compute_dtype`: the model runs under `torch.autocast` in that dtype (`PPOConfig.bf16`); the log-probs,
    entropies and values come out fp32 either way.
    """
    if with_values and not isinstance(model, AutoModelForCausalLMWithValueHead):
        raise TypeError(f"values need an AutoModelForCausalLMWithValueHead, got {type(model).__name__}")
    if not with_values and isinstance(model, AutoModelForCausalLMWithValueHead):
        model = model.pretrained_model
    if packed:
        p = batch.pack(attention_width)
        kwargs = dict(**p.model_inputs(), logits_to_keep=0)
        labels = p.labels  # [1, N]
    else:
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, logits_to_keep=batch.response_width + 1)
        labels = batch.labels()  # [B, T]
    # packed: outputs [R, W, ...] -> [1, N, ...] at the positions that predict response tokens; padded: the
    # output at column Lq - 1 + t predicts response token t
    select = p.gather if packed else (lambda x: x[:, :-1])
    lm = model.pretrained_model if with_values else model
    head = None  # padded: the model's own head on the last T + 1 columns (`logits_to_keep`)
    if from_hidden:
        head = HiddenLogprobHead(lm.get_output_embeddings(), labels, select, temperature, with_entropy)
    elif packed:  # the head at the N predicting positions only, not at every position of the packed rows
        head = SelectedPositionsHead(lm.get_output_embeddings(), select)
    swap = replaced_lm_head(lm, head) if head is not None else contextlib.nullcontext()
    with autocast(batch.input_ids.device.type, compute_dtype), swap:
        if with_values:
            out, values = model(**kwargs)
            values = select(values)
        else:
            out, values = model(**kwargs, use_cache=False).logits, None
    if from_hidden:  # the head's output: [..., 2] log-prob and entropy; no logits exist
        logp, entropy, logits = out[..., 0], (out[..., 1] if with_entropy else None), None
    else:
        logits = out if packed else select(out)  # [..., V]
        logp, entropy = _logprobs(logits, labels, temperature, with_entropy)
    if packed:  # [1, N, ...] -> [B, T, ...]
        logp, entropy, values, logits = (p.unpack(t) if t is not None else None
                                         for t in (logp, entropy, values, logits))
    if values is not None:
        values = values * batch.response_mask
    return ForwardOut(logp=logp, entropy=entropy, values=values, logits=logits if keep_logits else None)


def _logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of `labels` [...] under `logits` [..., V] with the fused logits op."""
    if labels.numel() == 0:  # no response token (a micro-batch of dropped samples): zeros still on the graph
        logp = logits.sum(dim=-1) * 0.0  # [..., 0]
        return logp, logp if with_entropy else None
    if with_entropy:
        return logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    return logprobs_from_logits(logits, labels, temperature=temperature), None


def forward_values(critic: AutoModelForCausalLMWithValueHead, batch: TokenBatch, packed: bool = False,
                   attention_width: int = 0, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values [B, T] of a separate critic at the positions that predict each response token (`packed`,
    `attention_width`, `compute_dtype` as for `forward_policy`)."""
    with autocast(batch.input_ids.device.type, compute_dtype):
        if packed:
            p = batch.pack(attention_width)
            values = critic.values(**p.model_inputs())  # [R, W]
            return p.unpack(p.gather(values)) * batch.response_mask  # [B, T]
        values = critic.values(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=batch.response_width + 1,
        )
    return values[:, :-1] * batch.response_mask  # [B, T]


@dataclass
class ExperiencePasses:
    """The no-grad forward passes over a batch at experience time, all [B, T] fp32, 0 on padding."""

    old_logp: torch.Tensor | None  # log pi_old(a_t | s_t); None: no policy pass (`old_policy.PiOld`)
    ref_logp: torch.Tensor  # log pi_ref(a_t | s_t)
    entropy: torch.Tensor | None  # entropy of pi_old at each position (None with old_logp)
    kl: torch.Tensor | None  # per-token KL penalty estimate of pi_old against pi_ref, 0 outside the loss mask
    values: torch.Tensor | None  # V(s_t) of the critic; None for the critic-free estimators

    def all_finite(self) -> bool:
        """Whether the log-probs and values hold only finite numbers (one device sync per tensor)."""
        checked = [t for t in (self.old_logp, self.ref_logp, self.values) if t is not None]
        return all(bool(torch.isfinite(t).all()) for t in checked)


def forward_experience(
    model: nn.Module,
    ref_model: nn.Module,
    critic: AutoModelForCausalLMWithValueHead | None,
    batch: TokenBatch,
    config: PPOConfig,
    microbatches: list[list[int]],
    comm: Comm,
    layout: PassLayout = PassLayout(),
    *,
    policy_pass: bool = True,
) -> ExperiencePasses:
    """`ExperiencePasses` of the whole `batch` on every rank: each rank runs its share of the rows, one
    forward of each model per micro-batch (`microbatches`: lists of row ids that cover the rank's share
    `comm.shard(B)`) under `torch.inference_mode` (`no_grad` across ranks), then the shares are gathered, so
    every whole-batch statistic computed from them (whitening, group baselines, the KL the controller sees)
    is the global one.
    Values come from `critic` when given, else from `model`'s value head (when the config uses a critic; that
    pass also gives the old log-probs). `policy_pass` False: no policy pass, no old log-probs, entropy or KL
    (`old_policy.PiOld` takes them from the update's own forward; never with a shared critic)."""
    full_kl = config.kl_penalty == "full"
    shared_critic = config.uses_critic and critic is None
    run_policy = policy_pass or shared_critic
    parts: dict[str, list[torch.Tensor]] = {"old_logp": [], "ref_logp": [], "entropy": [], "kl": [], "values": []}
    width = batch.response_width
    # inference mode keeps no autograd state at all; across ranks no_grad: FSDP2 unshards parameters into
    # buffers it updates in place later, which inference tensors forbid outside inference mode
    with torch.no_grad() if comm.distributed else torch.inference_mode():
        for rows in microbatches:
            chunk = batch.select(torch.tensor(rows))
            ref = forward_policy(ref_model, chunk, config.temperature, keep_logits=full_kl, packed=layout.ref,
                                 attention_width=layout.attention_width, from_hidden=layout.from_hidden,
                                 compute_dtype=layout.compute_dtype)
            named = {"ref_logp": ref.logp}
            if run_policy:
                pol = forward_policy(model, chunk, config.temperature, with_values=shared_critic, with_entropy=True,
                                     keep_logits=full_kl, packed=layout.policy,
                                     attention_width=layout.attention_width, from_hidden=layout.from_hidden,
                                     compute_dtype=layout.compute_dtype)
                named.update(old_logp=pol.logp, entropy=pol.entropy, values=pol.values, kl=kl_penalty(
                    config.kl_penalty, pol.logp, ref.logp, chunk.loss_mask, pol.logits, ref.logits,
                    config.temperature))
            if config.uses_critic and critic is not None:
                named["values"] = forward_values(critic, chunk, layout.critic, layout.attention_width,
                                                 layout.compute_dtype)
            for key, tensor in named.items():
                if tensor is not None:  # chunks are trimmed to their own widths: pad back to the batch's
                    parts[key].append(torch.nn.functional.pad(tensor.float(), (0, width - tensor.shape[1])))
    # out of inference mode: the joined tensors are ordinary ones, which autograd may save in the update
    first = comm.shard(batch.input_ids.shape[0]).start
    joined = {key: comm.all_gather_rows(_join(chunks, microbatches, first)) if chunks else None
              for key, chunks in parts.items()}
    return ExperiencePasses(**joined)


def _join(chunks: list[torch.Tensor], microbatches: list[list[int]], first: int) -> torch.Tensor:
    """Per-micro-batch rows [b_i, T] -> [n, T]: the rank's share (rows first .. first + n - 1) in row order."""
    stacked = torch.cat([c.clone() for c in chunks])  # [n, T] in micro-batch order
    order = torch.tensor([row for rows in microbatches for row in rows]) - first
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


@dataclass(frozen=True)
class Experience:
    """What the PPO epochs and the step's metrics need about a batch, computed once without gradients before
    the update and never changed after ([B, T] fp32 unless noted, 0 on padding). pi_old's
    log-probs are not here: `old_policy.PiOld` supplies them (from the policy pass, or from the update)."""

    batch: TokenBatch
    ref_logp: torch.Tensor  # log pi_ref(a_t | s_t)
    values: torch.Tensor | None  # V(s_t); None for the critic-free estimators
    kl_coef: float  # the KL coefficient beta of this step: in the rewards, or in the loss (`kl_in_reward`)
    raw_scores: torch.Tensor  # [B], as given or from the reward model / function (non-finite: dropped)
    scores: torch.Tensor  # [B], after clipping and the missing-EOS penalty
    non_score_rewards: torch.Tensor  # -kl_coef * kl (0 with the KL in the loss)
    rewards: torch.Tensor  # non-score rewards plus each score at its row's last trained token (maybe whitened)
    advantages: torch.Tensor
    returns: torch.Tensor
    behaviour_logp: torch.Tensor | None  # log pi_behaviour: the sampler's log-probs (off-policy samples) or None
