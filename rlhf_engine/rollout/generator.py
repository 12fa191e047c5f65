"""The `Generator` interface every backend implements, and `make_generator`, which picks one.

A generator is synchronous and single-threaded: `generate` samples a whole batch with one set
of weights, and `update_weights` runs between batches, so no completion ever mixes versions.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.transport.weights import WeightSpecs, weight_specs

log = logging.getLogger(__name__)


class Generator(ABC):
    """Samples completions for token-id prompts; takes versioned weight updates. `tokenizer` is the model's
    (set by each backend)."""

    tokenizer: object

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

    def generate(
        self, prompts: Sequence[Sequence[int]], *, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]:
        """Sample `sampling.n` completions for each prompt (token ids, no padding).

        Returns `len(prompts) * n` samples ordered by (prompt, sample): `Sample.prompt_id` is the prompt's
        position in `prompts`, `sample_id` is `f"{prompt}/{sample}"`, every token has this generator's
        version and is trained (`loss_mask` all True). `sampling` defaults
        to `config.sampling`. `seed` fixes the randomness of this call; by default batch `b` of
        this generator uses `config.batch_seed(b)`.
        """
        if self._closed:
            raise RuntimeError("generate() called on a closed generator")
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + 1 > self.config.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_model_len is {self.config.max_model_len}")
        if seed is None:
            seed = self.config.batch_seed(self._batches)
        self._batches += 1
        if not prompts:
            return []
        return self._generate(prompts, sampling if sampling is not None else self.config.sampling, seed)

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
    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Sample]: ...

    @abstractmethod
    def _apply_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...
