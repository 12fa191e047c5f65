"""`Sample`: one sampled sequence, from the generator to the loss; `SampleBatch`: a step's samples.

One record and one name per field end to end (torchtune's `Trajectory` is the model): a backend makes a
`Sample`, the wire carries it (`rlhf_engine.transport.messages`), the trainer checks it
(`rlhf_engine.engine.intake`), rank 0 broadcasts a `SampleBatch` of them
(`rlhf_engine.distributed.batch`) and `PPOTrainer.step_batch` trains on it.

Per-token fields are aligned with `response_ids` ([R] each):

    response_ids     every token after the prompt: the ones the policy sampled, and (multi-turn) the
                     environment's tokens between its turns
    loss_mask        True where the policy sampled the token (trained); False for environment tokens
    behaviour_logp   the sampler's log-prob of each sampled token (the behaviour policy); 0 where masked
    policy_versions  the policy version that produced each token (one value for a plain completion;
                     non-decreasing, several values once weights change while a sequence runs)

A multi-turn episode (`rlhf_engine.envs`) is one `Sample` too: its model turns start at `turn_starts`, the
environment's reward is `reward` and what happened in it is `episode` (`EpisodeInfo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

MAX_ID_CHARS = 256
"""Longest `sample_id` / `finish_reason`."""
MAX_INFO_KEYS = 16
"""Most entries of `EpisodeInfo.metrics`."""

TRUNCATIONS = ("", "max_turns", "token_budget", "env_error", "step_timeout")
"""Every `EpisodeInfo.truncated` reason ("": the environment ended the episode)."""
FAILED_EPISODE = ("env_error", "step_timeout")
"""`EpisodeInfo.truncated` reasons of an episode the environment failed: the trainer drops its sample from the
step (no reward can be trusted) and counts it."""


@dataclass(frozen=True)
class EpisodeInfo:
    """What happened in one episode (a single-turn completion is one turn and nothing else)."""

    turns: int = 1
    """Model turns sampled."""
    tool_calls: int = 0
    """Tool runs the environment made (its steps' `info["tool_calls"]`, summed)."""
    tool_errors: int = 0
    """Of those, the ones that failed (`info["tool_errors"]`)."""
    tool_timeouts: int = 0
    """Of those, the ones stopped at their time limit (`info["tool_timeouts"]`)."""
    env_seconds: float = 0.0
    """Seconds spent in the environment's `reset` and `step` calls."""
    truncated: str = ""
    """Empty when the environment ended the episode (`done`); else why it was cut: `max_turns`,
    `token_budget`, or a failure of the environment (`FAILED_EPISODE`: `env_error`, `step_timeout`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The environment's own numbers of its last step (its `info`'s other numeric entries, at most
    `MAX_INFO_KEYS`), logged by the trainer as `env/episode/<name>` means."""

    def __post_init__(self) -> None:
        for name in ("turns", "tool_calls", "tool_errors", "tool_timeouts"):
            if getattr(self, name) < 0:
                raise ValueError(f"episode {name} ({getattr(self, name)}) must be >= 0")
        if not math.isfinite(self.env_seconds) or self.env_seconds < 0:
            raise ValueError(f"episode env_seconds ({self.env_seconds}) must be finite and >= 0")
        if self.truncated not in TRUNCATIONS:
            raise ValueError(f"episode truncated reason {self.truncated[:40]!r} is none of {TRUNCATIONS}")
        if len(self.metrics) > MAX_INFO_KEYS:
            raise ValueError(f"episode metrics has {len(self.metrics)} entries, at most {MAX_INFO_KEYS}")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not 0 < len(key) <= 64 or not math.isfinite(value):
                raise ValueError(f"episode metric {str(key)[:64]!r}: names of 1..64 characters, finite values")

    @property
    def failed(self) -> bool:
        """The environment failed (`FAILED_EPISODE`): the sample is not trained on."""
        return self.truncated in FAILED_EPISODE


@dataclass
class Sample:
    """One sampled sequence of one prompt, with what the trainer needs to learn from it.

    Lists are accepted and converted; `policy_versions` may be one int (every token's) and `loss_mask`
    None (every token trained: a plain completion). Shapes and dtypes are checked at construction.
    """

    sample_id: str
    """Unique per run (the generator names it); the trainer drops a repeated one."""
    prompt_id: int
    """Which prompt: the trainer's data index (a backend returns the prompt's position in the batch given
    to `Generator.generate`; the generator loop puts the data index in its place)."""
    prompt_ids: torch.Tensor
    """[P] int64, the prompt's tokens."""
    response_ids: torch.Tensor
    """[R] int64, every token after the prompt (a stop token or the tokens of a stop string included)."""
    behaviour_logp: torch.Tensor
    """[R] float32, log pi_behaviour(response_ids[t] | prefix): the sampler's log-prob of each token under
    the distribution it drew from (after temperature, top-k, top-p); 0 where `loss_mask` is False."""
    policy_versions: torch.Tensor
    """[R] int64, the policy version that produced each token, non-decreasing."""
    finish_reason: str
    """`stop` (EOS, stop token or stop string) or `length` (max_new_tokens or max_model_len), as vLLM names it."""
    loss_mask: torch.Tensor | None = None
    """[R] bool: True on the tokens the policy sampled (trained), False on environment tokens; None given:
    every token."""
    generation_time: float = 0.0
    """Seconds the generator spent on the batch this sample came from."""
    finished_at: float = 0.0
    """Wall-clock time (Unix seconds, the generator's clock) when that batch finished; 0 if unknown.
    With `generation_time` it gives the generator's busy interval on the run's timeline."""
    eval: bool = False
    """It answers an evaluation batch: the trainer scores it and never trains on it."""
    turn_starts: torch.Tensor | None = None
    """[K] int64, where each of the K model turns starts in `response_ids`: 0 first (a sampled token),
    increasing, each at a sampled token right after an environment token; None given: one turn, [0]."""
    reward: float | None = None
    """The environment's reward for the episode (the sum of its steps' rewards); None: the trainer's reward
    function or model scores the sample."""
    episode: EpisodeInfo = field(default_factory=EpisodeInfo)
    """What happened in the episode (turns, tools, truncation)."""
    sender: str = ""
    """The generator that sent it, set by the trainer's transport from the authenticated session on
    receive; never read from the payload, and not sent."""

    def __post_init__(self) -> None:
        self.prompt_ids = _as_1d(self.prompt_ids, torch.int64, "prompt_ids")
        self.response_ids = _as_1d(self.response_ids, torch.int64, "response_ids")
        self.behaviour_logp = _as_1d(self.behaviour_logp, torch.float32, "behaviour_logp")
        n = self.response_ids.numel()
        if isinstance(self.policy_versions, int):
            self.policy_versions = torch.full((n,), self.policy_versions, dtype=torch.int64)
        self.policy_versions = _as_1d(self.policy_versions, torch.int64, "policy_versions")
        if self.loss_mask is None:
            self.loss_mask = torch.ones(n, dtype=torch.bool)
        self.loss_mask = _as_1d(self.loss_mask, torch.bool, "loss_mask")
        for name in ("behaviour_logp", "policy_versions", "loss_mask"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"sample {self.sample_id!r}: {getattr(self, name).numel()} {name} for "
                                 f"{n} response tokens")
        check_versions(self.policy_versions, f"sample {self.sample_id!r}")
        if self.turn_starts is None:
            self.turn_starts = torch.zeros(1 if n else 0, dtype=torch.int64)
        self.turn_starts = _as_1d(self.turn_starts, torch.int64, "turn_starts")
        check_turns(self.turn_starts, self.loss_mask, f"sample {self.sample_id!r}")
        if n and self.episode.turns != self.turn_starts.numel():  # (an empty response is dropped at intake)
            raise ValueError(f"sample {self.sample_id!r}: episode of {self.episode.turns} turns with "
                             f"{self.turn_starts.numel()} turn starts")
        if self.reward is not None and not math.isfinite(self.reward):
            raise ValueError(f"sample {self.sample_id!r}: reward ({self.reward}) must be finite or None")
        if not self.sample_id or len(self.sample_id) > MAX_ID_CHARS:
            raise ValueError(f"sample_id must have 1..{MAX_ID_CHARS} characters, got {self.sample_id!r}")
        if len(self.finish_reason) > MAX_ID_CHARS:
            raise ValueError(f"finish_reason longer than {MAX_ID_CHARS} characters: {self.finish_reason[:40]!r}...")

    @property
    def policy_version(self) -> int:
        """The oldest token's policy version (the one staleness counts); for an empty response, -1."""
        return int(self.policy_versions[0]) if self.policy_versions.numel() else -1


@dataclass
class SampleBatch:
    """B samples as `PPOTrainer.step_batch` takes them (the per-token fields of `Sample`, one list each),
    with their scores and the prompt records' fields; what rank 0 broadcasts to the other ranks."""

    prompt_ids: list[torch.Tensor]
    """B x [P_i] int64."""
    response_ids: list[torch.Tensor]
    """B x [R_i] int64 (not yet cut after EOS)."""
    behaviour_logp: list[torch.Tensor] | None = None
    """B x [R_i] float32, the sampler's log-probs; None: on-policy samples (pi_old is the behaviour policy)."""
    policy_versions: list[torch.Tensor] | None = None
    """B x [R_i] int64; None: unknown (no staleness metrics)."""
    loss_mask: list[torch.Tensor] | None = None
    """B x [R_i] bool; None given: every token trained."""
    scores: torch.Tensor | None = None
    """[B] float32; None: the trainer scores the samples itself."""
    columns: dict[str, list[Any]] | None = None
    """`{field: B JSON values}` of the prompts' records, for a reward function that takes them."""

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.response_ids) != n:
            raise ValueError(f"{n} prompt_ids but {len(self.response_ids)} response_ids")
        _check_seqs(self.prompt_ids, torch.int64, "prompt_ids")
        _check_seqs(self.response_ids, torch.int64, "response_ids")
        if self.loss_mask is None:
            self.loss_mask = [torch.ones(len(r), dtype=torch.bool) for r in self.response_ids]
        for name, dtype in (("behaviour_logp", torch.float32), ("policy_versions", torch.int64),
                            ("loss_mask", torch.bool)):
            seqs = getattr(self, name)
            if seqs is None:
                continue
            if len(seqs) != n:
                raise ValueError(f"{len(seqs)} {name} for {n} samples")
            _check_seqs(seqs, dtype, name)
            for i, (t, r) in enumerate(zip(seqs, self.response_ids)):
                if t.shape != r.shape:
                    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; response_ids[{i}] has {tuple(r.shape)}")
        for i, v in enumerate(self.policy_versions or []):
            check_versions(v, f"policy_versions[{i}]")
        if self.scores is not None and self.scores.shape != (n,):
            raise ValueError(f"scores have shape {tuple(self.scores.shape)}, expected ({n},)")
        for name, values in (self.columns or {}).items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} samples")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], scores: torch.Tensor | None = None,
                     columns: dict[str, list[Any]] | None = None) -> "SampleBatch":
        return cls(
            prompt_ids=[s.prompt_ids for s in samples],
            response_ids=[s.response_ids for s in samples],
            behaviour_logp=[s.behaviour_logp for s in samples],
            policy_versions=[s.policy_versions for s in samples],
            loss_mask=[s.loss_mask for s in samples],
            scores=scores,
            columns=columns,
        )

    def oldest_versions(self) -> torch.Tensor | None:
        """[B] int64: each sample's oldest token's policy version (None without versions)."""
        if self.policy_versions is None:
            return None
        return torch.tensor([int(v.min()) if v.numel() else 0 for v in self.policy_versions], dtype=torch.int64)


def check_versions(versions: torch.Tensor, what: str) -> None:
    """Raise unless `versions` [R] are >= 0 and non-decreasing."""
    if versions.numel() and (bool((versions < 0).any()) or bool((versions[1:] < versions[:-1]).any())):
        raise ValueError(f"{what}: policy versions must be >= 0 and non-decreasing, got {versions[:16].tolist()}")


def check_turns(turn_starts: torch.Tensor, loss_mask: torch.Tensor, what: str) -> None:
    """Raise unless `turn_starts` [K] are the starts of the sampled runs of `loss_mask` [R] that follow an
    environment token: the first 0 (or none for an empty response), increasing, each on a sampled token
    whose predecessor is an environment token."""
    n = loss_mask.numel()
    starts = turn_starts.tolist()
    if (n == 0) != (not starts) or (starts and starts[0] != 0):
        raise ValueError(f"{what}: turn_starts must begin with 0 (none for an empty response), got {starts[:16]}")
    if n and not bool(loss_mask[0]):
        raise ValueError(f"{what}: the response must begin with a sampled token (the first turn's)")
    for prev, start in zip(starts, starts[1:]):
        if not prev < start < n:
            raise ValueError(f"{what}: turn_starts must increase within the {n} response tokens, got {starts[:16]}")
    for start in starts[1:]:
        if not bool(loss_mask[start]) or bool(loss_mask[start - 1]):
            raise ValueError(f"{what}: turn {start} does not start on a sampled token after an environment token")


def _as_1d(values, dtype: torch.dtype, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor


def _check_seqs(seqs: Sequence[torch.Tensor], dtype: torch.dtype, name: str) -> None:
    for i, t in enumerate(seqs):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype != dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] must be a 1-D {dtype} tensor, got {got}")
