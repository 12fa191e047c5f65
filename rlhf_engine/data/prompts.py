"""PPO prompts: read, tokenize, and hand out in deterministic shuffled epochs.

The trainer owns the data position: `PromptStream.state_dict()` is saved in checkpoints, so a
resumed run sees exactly the prompts an uninterrupted run would have seen. A record's other fields
(its columns, `rlhf_engine.data.columns`) stay on the trainer, by prompt index, for the reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_engine.data.columns import record_columns
from rlhf_engine.data.formats import _messages, render_chat
from rlhf_engine.data.records import DataError, DataStats, read_records


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt; `prompt_id` is its index in the dataset."""

    prompt_id: int
    token_ids: list[int]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a dataset, tokenized, with each record's columns; index i is prompt id i."""

    source: str
    token_ids: list[list[int]]
    prompts: list[Any]
    """Each record's `prompt` as read (a string, or chat messages)."""
    columns: list[dict[str, Any]]
    """Each record's fields but `prompt` (JSON values), for the reward functions."""
    wheres: list[str]
    """Where each record came from (`file:line`)."""
    column_names: frozenset[str] = field(init=False)
    """Every column some record has."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_names", frozenset(k for c in self.columns for k in c))

    def __len__(self) -> int:
        return len(self.token_ids)

    def record(self, i: int) -> dict[str, Any]:
        """Record i's fields as read: its `prompt` and its columns (what an environment's `reset` takes)."""
        return {"prompt": self.prompts[i], **self.columns[i]}


def read_prompts(source: Any, tokenizer, max_prompt_length: int, stats: DataStats | None = None) -> PromptSet:
    """Token ids of every record's `prompt` (a string, or chat messages rendered with the tokenizer's chat
    template and its generation prompt: a tokenizer without one is a `DataError`), and the record's other
    fields.

    Prompts longer than `max_prompt_length` keep their last tokens (counted in `stats.truncated`).
    """
    stats = stats if stats is not None else DataStats("prompts")
    token_ids, values, columns, wheres = [], [], [], []
    for record in read_records(source, stats):
        if "prompt" not in record.fields:
            raise DataError(f"{record.where}: missing field 'prompt' (fields: {sorted(record.fields)})")
        value = record.fields["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{record.where}: field 'prompt' is an empty string")
            ids = tokenizer(value, add_special_tokens=True)["input_ids"]
        else:
            if not getattr(tokenizer, "chat_template", None):  # the SFT fallback format would be sampled from
                raise DataError(f"{record.where}: field 'prompt' holds chat messages but the policy's tokenizer has "
                                "no chat template: give the prompt as a string, or a model whose tokenizer has one")
            text = render_chat(tokenizer, _messages(value, record.where, "prompt"), add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
            stats.truncated += 1
        token_ids.append(list(ids))
        values.append(value)
        columns.append(record_columns(record.fields))
        wheres.append(record.where)
    if not token_ids:
        raise DataError(f"no prompts in {source}")
    stats.kept = len(token_ids)
    return PromptSet(str(source), token_ids, values, columns, wheres)


class PromptStream:
    """Endless batches of prompts: each epoch a permutation of the dataset (seeded by `seed` and the
    epoch number), batches taken in order across epoch boundaries."""

    def __init__(self, prompts: list[list[int]], seed: int, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts."""
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            i = self._order[self.position]
            self.position += 1
            out.append(Prompt(i, self.prompts[i]))
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(
                f"the checkpoint's prompt set had {state['num_prompts']} prompts; this one has {len(self.prompts)}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
