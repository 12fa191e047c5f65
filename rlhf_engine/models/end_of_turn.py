"""Which token ids end a turn: the one set the samplers stop at and the trainer cuts and scores by.

A model may declare several (`generation_config.eos_token_id` is an int or a list: Llama-3 ends a turn with
`<|eot_id|>` and its text with `<|end_of_text|>`, Qwen with `<|im_end|>` and `<|endoftext|>`); vLLM stops at
every id of `generation_config.json`, so the HF generator and the trainer take the same set from here.
"""

from __future__ import annotations

from typing import Any


def end_of_turn_ids(tokenizer: Any, declared: int | list[int] | None) -> tuple[int, ...]:
    """The ids that end a turn: those the model declares (`declared`: `generation_config.eos_token_id`, an
    int, a list or None) and the tokenizer's EOS, in that order, without repeats."""
    ids = [declared] if isinstance(declared, int) else list(declared or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(eos)
    return tuple(dict.fromkeys(int(i) for i in ids))


def model_end_of_turn_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """`end_of_turn_ids` of a transformers model: its generation config's EOS ids, else its config's."""
    generation = getattr(model, "generation_config", None)
    declared = getattr(generation, "eos_token_id", None)
    if declared is None:
        declared = getattr(model.config, "eos_token_id", None)
    return end_of_turn_ids(tokenizer, declared)
