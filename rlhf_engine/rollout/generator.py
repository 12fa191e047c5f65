"""The `Generator` interface every backend implements.

A generator is synchronous and single-threaded. Two ways to sample:

- `generate`: a whole batch with one set of weights; `update_weights` runs between calls, so no completion
  mixes versions.
- `submit` / `step` (continuous generation, `rollout.continuous`): sequences are submitted at any time and
  `step` advances them, returning those that finished; `update_weights` may run between two steps while
  sequences are running (their tokens after it carry the new version), and `recompute` re-prefills the running
  ones under the current weights. The base class runs one submission per `step` as a `generate` call
  (batch-at-a-time: nothing runs across an update); the vLLM backend advances every running sequence by one
  decode step.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.transport.weights import WeightSpecs, weight_specs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """Prompts submitted together for continuous generation (`Generator.submit`)."""

    tag: Any
    """The submitter's handle, returned with each finished sample."""
    prompts: list[list[int]]
    sampling: SamplingConfig
    seed: int
    """As `generate`'s: sample j of prompt i draws with seed + i * n + j."""
    max_new_tokens: list[int] | None = None
    """Per prompt: most response tokens (<= `sampling.max_new_tokens`); None: `sampling.max_new_tokens`."""

    def budget(self, i: int) -> int:
        """The response budget of prompt `i`."""
        return self.sampling.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens[i]

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.sampling.n


class Generator(ABC):
    """Samples completions for token-id prompts; takes versioned weight updates. `tokenizer` is the model's
    (set by each backend)."""

    tokenizer: object
    can_recompute: bool = False
    """`recompute` re-prefills running sequences (`generator.inflight_update: recompute`)."""
    steps_sequences: bool = False
    """`step` advances every running sequence by one token (sequences run across updates); False: one
    submission per `step`, whole."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.version = config.initial_version
        self.weight_specs = weight_specs(config.model, config.lora)
        """(name, shape, dtype) of every tensor a weight update carries as it comes from the trainer: the
        stored weights, or with `config.lora` the adapters (`transport.weights`)."""
        self._specs = WeightSpecs.of(self.weight_specs)
        self.expected = self._specs.shapes
        self._batches = 0
        self._closed = False
        self._queue: deque[Submission] = deque()

    def generate(
        self, prompts: Sequence[Sequence[int]], *, sampling: SamplingConfig | None = None, seed: int | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Sample `sampling.n` completions for each prompt (token ids, no padding).

        Returns `len(prompts) * n` samples ordered by (prompt, sample): `Sample.prompt_id` is the prompt's
        position in `prompts`, `sample_id` is `f"{prompt}/{sample}"`, every token has this generator's
        version and is trained (`loss_mask` all True). `sampling` defaults
        to `config.sampling`. `seed` fixes the randomness of this call; by default batch `b` of
        this generator uses `config.batch_seed(b)`. `max_new_tokens`: each prompt's own budget (at most
        `sampling.max_new_tokens`); its completions end there with finish reason `length`.
        """
        if seed is None:
            seed = self.config.batch_seed(self._batches)
        self._batches += 1
        sub = self._submission(None, prompts, sampling, seed, max_new_tokens)
        return self._generate(sub) if sub.prompts else []

    # ---- continuous generation -------------------------------------------------------------------
    def submit(self, tag: Any, prompts: Sequence[Sequence[int]], *, sampling: SamplingConfig, seed: int,
               max_new_tokens: Sequence[int] | None = None) -> None:
        """Queue `prompts` (`sampling.n` samples each, seeded as `generate`'s); `step` returns them as they
        finish, each with `tag`."""
        sub = self._submission(tag, prompts, sampling, seed, max_new_tokens)
        if sub.prompts:
            self._submit(sub)

    def step(self) -> list[tuple[Any, Sample]]:
        """Advance the submitted sequences; returns the samples that finished, with their submission's tag
        (`Sample.prompt_id` is the prompt's position in its submission, `sample_id` `f"{prompt}/{sample}"`, as
        `generate`'s). Here: the oldest submission, whole."""
        if self._closed:
            raise RuntimeError("step() called on a closed generator")
        if not self._queue:
            return []
        sub = self._queue.popleft()
        return [(sub.tag, s) for s in self._generate(sub)]

    @property
    def running(self) -> int:
        """Sequences submitted and not yet returned by `step`."""
        return sum(sub.sequences for sub in self._queue)

    def recompute(self) -> int:
        """Re-prefill every running sequence under the current weights (its next tokens are sampled on KV of
        these weights); returns how many. Only backends with `can_recompute`."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-prefill running sequences")

    def _submit(self, sub: Submission) -> None:
        self._queue.append(sub)

    def _submission(self, tag: Any, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None, seed: int,
                    max_new_tokens: Sequence[int] | None) -> Submission:
        """The checked `Submission` of a `generate` or `submit` call."""
        if self._closed:
            raise RuntimeError("generate() called on a closed generator")
        sampling = sampling if sampling is not None else self.config.sampling
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + 1 > self.config.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_model_len is {self.config.max_model_len}")
        if max_new_tokens is not None:
            max_new_tokens = [int(m) for m in max_new_tokens]
            if len(max_new_tokens) != len(prompts) or any(not 1 <= m <= sampling.max_new_tokens
                                                          for m in max_new_tokens):
                raise ValueError(f"max_new_tokens must give each of the {len(prompts)} prompts a budget in "
                                 f"[1, {sampling.max_new_tokens}], got {max_new_tokens[:8]}")
        return Submission(tag, prompts, sampling, seed, max_new_tokens)

    def update_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> bool:
        """Replace all weights with `named_tensors` (HF names) as policy `version`; with `config.lora`,
        `named_tensors` are the adapters (peft names, `transport.weights`) on the frozen base.

        Returns False and changes nothing when `version` is not newer than the current one
        (stale or duplicate). Raises `ValueError` (changing nothing) when the tensors do not
        match the model's names and shapes.
        """
        if self._closed:
            raise RuntimeError("update_weights() called on a closed generator")
        if version <= self.version:
            log.info("ignoring weight update v%d: generator already has v%d", version, self.version)
            return False
        self._specs.check_update(named_tensors)
        self._apply_weights(version, named_tensors)
        self.version = version
        return True

    def close(self) -> None:
        """Release the backend (for vLLM: stop its engine processes). Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def _generate(self, sub: Submission) -> list[Sample]:
        """All of `sub`'s samples, ordered by (prompt, sample), with this generator's weights."""

    @abstractmethod
    def _apply_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...
