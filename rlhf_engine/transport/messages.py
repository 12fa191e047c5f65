"""The records the generator and trainer exchange, and their mapping onto wire headers: a rollout message
carries one `Sample` (`rlhf_engine.data.samples`), a prompts message a `PromptBatch`, weights a `WeightUpdate`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlhf_engine.data.samples import EpisodeInfo, Sample
from rlhf_engine.transport.wire import (
    PromptsHeader,
    RolloutHeader,
    WireError,
    tensor_spec,
)

SAMPLE_TENSORS = (("prompt_ids", "int64"), ("response_ids", "int64"), ("behaviour_logp", "float32"),
                  ("policy_versions", "int64"), ("loss_mask", "bool"), ("turn_starts", "int64"))
"""The tensor frames of a rollout message, in order, each 1-D: the `Sample`'s tensors under its names."""
EPISODE_FIELDS = ("turns", "tool_calls", "tool_errors", "tool_timeouts", "env_seconds", "truncated", "metrics")
"""The `EpisodeInfo` fields, each a field of the rollout header under its name."""


def sample_to_wire(sample: Sample, sender: str, seq: int) -> tuple[RolloutHeader, list[torch.Tensor]]:
    """A rollout message: the sample's fields in the header, its tensors as raw frames."""
    tensors = [getattr(sample, name) for name, _ in SAMPLE_TENSORS]
    header = RolloutHeader(
        sender=sender,
        seq=seq,
        tensors=tuple(tensor_spec(name, t) for (name, _), t in zip(SAMPLE_TENSORS, tensors)),
        sample_id=sample.sample_id,
        prompt_id=sample.prompt_id,
        finish_reason=sample.finish_reason,
        generation_time=sample.generation_time,
        finished_at=sample.finished_at,
        eval=sample.eval,
        reward=sample.reward,
        **{name: getattr(sample.episode, name) for name in EPISODE_FIELDS},
    )
    return header, tensors


def sample_from_wire(header: RolloutHeader, tensors: Sequence[torch.Tensor], max_prompt_tokens: int | None = None,
                     max_response_tokens: int | None = None) -> Sample:
    """The `Sample` of a decoded rollout message (``sender`` = ``header.sender``; the receiver checks it);
    raises ``WireError`` when the layout is wrong, a token count exceeds its limit, or the sample's own checks
    (lengths agree, versions non-decreasing) fail."""
    layout = [(s.name, s.dtype, len(s.shape)) for s in header.tensors]
    expected = [(name, dtype, 1) for name, dtype in SAMPLE_TENSORS]
    if layout != expected:
        raise WireError("bad_rollout", f"tensors {layout}, expected {expected}")
    limits = (max_prompt_tokens,) + (max_response_tokens,) * (len(SAMPLE_TENSORS) - 1)
    for spec, limit in zip(header.tensors, limits):
        if limit is not None and spec.shape[0] > limit:
            raise WireError("rollout_too_large", f"sample {header.sample_id[:40]!r}: {spec.name} has "
                                                 f"{spec.shape[0]} entries, at most {limit} allowed")
    try:
        return Sample(
            sample_id=header.sample_id,
            prompt_id=header.prompt_id,
            **{name: t for (name, _), t in zip(SAMPLE_TENSORS, tensors)},
            finish_reason=header.finish_reason,
            generation_time=header.generation_time,
            finished_at=header.finished_at,
            eval=header.eval,
            reward=header.reward,
            episode=EpisodeInfo(**{name: getattr(header, name) for name in EPISODE_FIELDS}),
            sender=header.sender,
        )
    except ValueError as e:
        raise WireError("bad_rollout", str(e)) from None


@dataclass
class PromptBatch:
    """Prompts the trainer hands a generator; the trainer owns the data position.

    ``prompts[i]`` holds the token ids of prompt ``prompt_ids[i]``. A generator must not
    sample from this batch with weights older than ``min_policy_version`` (that is how the
    trainer bounds staleness). An evaluation batch (``eval_samples`` > 0) is sampled
    ``eval_samples`` times per prompt at ``eval_temperature`` instead of the generator's own
    sampling, and its rollouts come back tagged ``eval``. With an environment, ``records[i]`` is prompt i's
    dataset record (its JSON fields), which the environment's ``reset`` reads. ``max_new_tokens[i]``, when
    given, is prompt i's response budget (>= 1; a generator also caps it at its own).
    """

    batch_id: int
    prompt_ids: list[int]
    prompts: list[list[int]]
    min_policy_version: int = 0
    eval_samples: int = 0
    eval_temperature: float = 0.0
    records: list[dict] | None = None
    max_new_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = [int(i) for i in self.prompt_ids]
        self.prompts = [[int(t) for t in p] for p in self.prompts]
        if len(self.prompt_ids) != len(self.prompts):
            raise ValueError(f"batch {self.batch_id}: {len(self.prompt_ids)} prompt_ids for {len(self.prompts)} prompts")
        if self.eval_samples < 0 or not math.isfinite(self.eval_temperature) or self.eval_temperature < 0:
            raise ValueError(f"batch {self.batch_id}: eval_samples ({self.eval_samples}) must be >= 0 and "
                             f"eval_temperature ({self.eval_temperature}) finite and >= 0")
        if self.records is not None and (len(self.records) != len(self.prompts)
                                         or not all(isinstance(r, dict) for r in self.records)):
            raise ValueError(f"batch {self.batch_id}: records must be one dict per prompt")
        if self.max_new_tokens is not None:
            self.max_new_tokens = [int(m) for m in self.max_new_tokens]
            if len(self.max_new_tokens) != len(self.prompts) or any(m < 1 for m in self.max_new_tokens):
                raise ValueError(f"batch {self.batch_id}: max_new_tokens must be one budget >= 1 per prompt")

    @property
    def is_eval(self) -> bool:
        return self.eval_samples > 0

    def to_wire(self, sender: str, seq: int) -> tuple[PromptsHeader, list[torch.Tensor]]:
        lengths = [len(p) for p in self.prompts]
        flat = torch.tensor([t for p in self.prompts for t in p], dtype=torch.int64)  # [sum(P_i)]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)  # [B + 1]
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        header = PromptsHeader(
            sender=sender,
            seq=seq,
            tensors=(tensor_spec("tokens", flat), tensor_spec("offsets", offsets)),
            batch_id=self.batch_id,
            prompt_ids=tuple(self.prompt_ids),
            min_policy_version=self.min_policy_version,
            eval_samples=self.eval_samples,
            eval_temperature=self.eval_temperature,
            records=tuple(json.dumps(r) for r in self.records) if self.records is not None else (),
            max_new_tokens=tuple(self.max_new_tokens) if self.max_new_tokens is not None else (),
        )
        return header, [flat, offsets]

    @classmethod
    def from_wire(cls, header: PromptsHeader, tensors: Sequence[torch.Tensor]) -> "PromptBatch":
        layout = [(s.name, s.dtype, len(s.shape)) for s in header.tensors]
        if layout != [("tokens", "int64", 1), ("offsets", "int64", 1)]:
            raise WireError("bad_prompts", f"tensors {layout}")
        flat, offsets = tensors
        n = len(header.prompt_ids)
        bounds = offsets.tolist()
        if (
            len(bounds) != n + 1
            or (bounds and (bounds[0] != 0 or bounds[-1] != flat.numel()))
            or any(a > b for a, b in zip(bounds, bounds[1:]))
        ):
            raise WireError("bad_prompts", f"offsets {bounds[:8]}... do not split {flat.numel()} tokens into {n} prompts")
        tokens = flat.tolist()
        prompts = [tokens[a:b] for a, b in zip(bounds, bounds[1:])]
        try:
            records = [json.loads(r) for r in header.records] if header.records else None
            return cls(header.batch_id, list(header.prompt_ids), prompts, header.min_policy_version,
                       header.eval_samples, header.eval_temperature, records,
                       list(header.max_new_tokens) if header.max_new_tokens else None)
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError included; RecursionError: nested too deep
            raise WireError("bad_prompts", str(e)) from None


@dataclass
class WeightUpdate:
    """A complete, versioned set of named tensors, handed over only once fully received.

    The tensors may be views into a shared-memory buffer that the trainer reuses once
    every generator has acknowledged: use them (e.g. copy them into the model), then call
    ``ack()``; do not keep them after that (``clone()`` what you need to keep).
    """

    version: int
    tensors: dict[str, torch.Tensor]
    _ack: Callable[[bool], None] | None = field(default=None, repr=False)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.tensors.items())

    def ack(self, applied: bool = True) -> None:
        """Tell the trainer this version was taken (idempotent); releases the buffer."""
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack(applied)
