"""The records the generator and trainer exchange, and their mapping onto wire headers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlhf_engine.transport.wire import (
    PromptsHeader,
    RolloutHeader,
    WireError,
    tensor_spec,
)

MAX_ID_CHARS = 256
"""Longest accepted rollout id / finish reason on receive."""


def _as_1d(values, dtype: torch.dtype, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor


@dataclass
class Rollout:
    """One completion of one prompt, as the generator produced it.

    Lists are accepted and converted: ``prompt_token_ids`` / ``response_token_ids`` to
    int64 ``[P]`` / ``[R]``, ``logprobs`` to float32 ``[R]`` (the sampler's log-prob of
    each generated token).
    """

    rollout_id: str
    """Unique per run (e.g. ``f"{generator_id}-{n}"``); duplicates are dropped by the trainer."""
    prompt_id: int
    """The id of the prompt in its ``PromptBatch`` (the trainer's data index)."""
    prompt_token_ids: torch.Tensor
    response_token_ids: torch.Tensor
    logprobs: torch.Tensor
    policy_version: int
    """Version of the weights that sampled this completion."""
    finish_reason: str
    """``"stop"`` (EOS / stop string) or ``"length"`` (hit max_new_tokens), as vLLM names it."""
    generation_time: float
    """Seconds the generator spent on the batch this completion came from."""
    finished_at: float = 0.0
    """Wall-clock time (Unix seconds, generator's clock) when that batch finished; 0 if unknown.
    With `generation_time` it gives the generator's busy interval for the run's timeline."""
    eval: bool = False
    """It answers an evaluation batch (`PromptBatch.eval_samples`): the trainer scores it and never trains on it."""
    sender: str = ""
    """The generator that sent it (``GeneratorInfo.name``), set by the trainer's transport from the
    authenticated session on receive; never read from the payload, and not sent."""

    def __post_init__(self) -> None:
        self.prompt_token_ids = _as_1d(self.prompt_token_ids, torch.int64, "prompt_token_ids")
        self.response_token_ids = _as_1d(self.response_token_ids, torch.int64, "response_token_ids")
        self.logprobs = _as_1d(self.logprobs, torch.float32, "logprobs")
        if self.logprobs.numel() != self.response_token_ids.numel():
            raise ValueError(
                f"rollout {self.rollout_id!r}: {self.logprobs.numel()} logprobs for "
                f"{self.response_token_ids.numel()} response tokens"
            )
        if not self.rollout_id or len(self.rollout_id) > MAX_ID_CHARS:
            raise ValueError(f"rollout_id must have 1..{MAX_ID_CHARS} characters, got {self.rollout_id!r}")
        if len(self.finish_reason) > MAX_ID_CHARS:
            raise ValueError(f"finish_reason longer than {MAX_ID_CHARS} characters: {self.finish_reason[:40]!r}...")

    def to_wire(self, sender: str, seq: int) -> tuple[RolloutHeader, list[torch.Tensor]]:
        tensors = [self.prompt_token_ids, self.response_token_ids, self.logprobs]
        names = ("prompt_token_ids", "response_token_ids", "logprobs")
        header = RolloutHeader(
            sender=sender,
            seq=seq,
            tensors=tuple(tensor_spec(n, t) for n, t in zip(names, tensors)),
            rollout_id=self.rollout_id,
            prompt_id=self.prompt_id,
            policy_version=self.policy_version,
            finish_reason=self.finish_reason,
            generation_time=self.generation_time,
            finished_at=self.finished_at,
            eval=self.eval,
        )
        return header, tensors

    @classmethod
    def from_wire(cls, header: RolloutHeader, tensors: Sequence[torch.Tensor], max_prompt_tokens: int | None = None,
                  max_response_tokens: int | None = None) -> "Rollout":
        """Build from a decoded message (``sender`` = ``header.sender``; the receiver checks it);
        raises ``WireError`` when the layout is wrong or a token count exceeds its limit."""
        layout = [(s.name, s.dtype, len(s.shape)) for s in header.tensors]
        expected = [("prompt_token_ids", "int64", 1), ("response_token_ids", "int64", 1), ("logprobs", "float32", 1)]
        if layout != expected:
            raise WireError("bad_rollout", f"tensors {layout}, expected {expected}")
        for spec, limit in zip(header.tensors, (max_prompt_tokens, max_response_tokens, max_response_tokens)):
            if limit is not None and spec.shape[0] > limit:
                raise WireError("rollout_too_large", f"rollout {header.rollout_id[:40]!r}: {spec.name} has "
                                                     f"{spec.shape[0]} entries, at most {limit} allowed")
        try:
            return cls(
                rollout_id=header.rollout_id,
                prompt_id=header.prompt_id,
                prompt_token_ids=tensors[0],
                response_token_ids=tensors[1],
                logprobs=tensors[2],
                policy_version=header.policy_version,
                finish_reason=header.finish_reason,
                generation_time=header.generation_time,
                finished_at=header.finished_at,
                eval=header.eval,
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
    sampling, and its rollouts come back tagged ``eval``.
    """

    batch_id: int
    prompt_ids: list[int]
    prompts: list[list[int]]
    min_policy_version: int = 0
    eval_samples: int = 0
    eval_temperature: float = 0.0

    def __post_init__(self) -> None:
        self.prompt_ids = [int(i) for i in self.prompt_ids]
        self.prompts = [[int(t) for t in p] for p in self.prompts]
        if len(self.prompt_ids) != len(self.prompts):
            raise ValueError(f"batch {self.batch_id}: {len(self.prompt_ids)} prompt_ids for {len(self.prompts)} prompts")
        if self.eval_samples < 0 or not math.isfinite(self.eval_temperature) or self.eval_temperature < 0:
            raise ValueError(f"batch {self.batch_id}: eval_samples ({self.eval_samples}) must be >= 0 and "
                             f"eval_temperature ({self.eval_temperature}) finite and >= 0")

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
            return cls(header.batch_id, list(header.prompt_ids), prompts, header.min_policy_version,
                       header.eval_samples, header.eval_temperature)
        except ValueError as e:
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
