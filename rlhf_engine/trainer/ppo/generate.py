"""In-process sampling for `PPOTrainer.generate`: transformers' `generate` with the PPO config's sampling
settings, seeded per call, responses cut after their first EOS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlhf_engine.data.collate import left_pad
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import truncate_after_eos
from rlhf_engine.trainer.ppo.inputs import TokenSeqs, as_token_list


@torch.no_grad()
def sample_responses(lm: nn.Module, query_tensors: TokenSeqs, config: PPOConfig, pad_token_id: int,
                     eos_token_ids: Sequence[int], seed: int, **generation_kwargs) -> list[torch.Tensor] | torch.Tensor:
    """Sample one response per query from the causal LM `lm` (a peft model samples with its adapters).

    query_tensors: a list of 1-D token tensors (or one 1-D tensor, which returns one tensor).
    Defaults: do_sample, max_new_tokens=response_length, temperature, no top-k/top-p; kwargs override.
    The sampling runs under `seed` without touching torch's global RNG.
    Returns the response tokens only, each cut after its first end-of-turn token (any of `eos_token_ids`,
    kept).
    """
    single = isinstance(query_tensors, torch.Tensor) and query_tensors.ndim == 1
    queries = as_token_list([query_tensors] if single else query_tensors, "query_tensors")
    input_ids, attention_mask = left_pad(queries, pad_token_id)  # [B, P]
    width = input_ids.shape[1]
    kwargs = dict(
        do_sample=True,
        max_new_tokens=config.response_length,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids) or None,
    )
    kwargs.update(generation_kwargs)
    device = next(lm.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        out = lm.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    responses = [_cut_response(row, eos_token_ids, pad_token_id) for row in out[:, width:]]
    return responses[0] if single else responses


def _cut_response(row: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """A generated row [n] up to and including its first end-of-turn token; without one, trailing padding
    removed."""
    cut = truncate_after_eos(row, eos_token_ids)
    if cut.numel() < row.numel():
        return cut
    keep = (row != pad_token_id).nonzero()
    return row[: int(keep[-1, 0]) + 1] if keep.numel() else row[:1]
