"""`Completion`: one sampled response, as a backend returns it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One completion of one prompt, with the sampler's log-probs and the policy that made it.

    `logprobs[t]` is log pi(response_ids[t] | prefix) under the distribution the sampler drew
    from (after temperature, top-k and top-p), in fp32.
    """

    prompt_index: int
    """Position of the prompt in the batch given to `generate`."""
    sample_index: int
    """Which of the `n` completions of that prompt (0-based)."""
    prompt_ids: torch.Tensor
    """[P] int64."""
    response_ids: torch.Tensor
    """[T] int64, every sampled token (a stop token or the tokens of a stop string included)."""
    logprobs: torch.Tensor
    """[T] float32, the sampler's log-prob of each response token."""
    policy_version: int
    """Version of the weights that sampled every token of this completion."""
    finish_reason: str
    """`stop` (eos, stop token or stop string) or `length` (max_new_tokens or max_model_len)."""
    generation_time: float
    """Seconds the whole batch took to generate."""

    def __post_init__(self) -> None:
        if self.response_ids.shape != self.logprobs.shape:
            raise ValueError(
                f"response_ids {tuple(self.response_ids.shape)} and logprobs {tuple(self.logprobs.shape)} differ in shape"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason ({self.finish_reason!r}) must be one of {FINISH_REASONS}")
