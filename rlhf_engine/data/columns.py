"""Dataset fields as keyword arguments of reward functions (TRL's `reward_funcs(prompts, completions, **columns)`).

A prompt record's fields other than `prompt` are its *columns*. A reward or gold function takes the ones it
names after `(prompts, completions)`, each as a list with one entry per completion (a prompt's value repeated
for each of its completions, in the order of `completions`):

    def reward(prompts, completions, answer):            # gets answer=[...]
    def reward(prompts, completions, answer, **columns):  # answer, and every other column
    def reward(prompts, completions):                     # no columns (as before)

A named parameter without a default must be a field of every record (`check_columns`, when the prompts are
read); a record that lacks a column passed otherwise (a parameter with a default, or `**kwargs`) gives None.
Values are the records' JSON values: they reach the other trainer ranks as JSON.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_engine.data.records import DataError

PROMPT_FIELD = "prompt"
"""The field the prompt comes from; every other field is a column."""


@dataclass(frozen=True)
class ColumnParams:
    """The columns a function takes: the keyword parameters after `(prompts, completions)`."""

    named: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    """The named ones without a default."""
    any: bool = False
    """It has `**kwargs`: it takes every column."""

    @property
    def takes_columns(self) -> bool:
        return self.any or bool(self.named)


def column_params(fn: Callable) -> ColumnParams:
    """What `fn` takes besides `(prompts, completions)`, from its signature (`__signature__` included, so a
    combinator can declare what its terms take); a callable without a readable signature takes nothing."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ColumnParams()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    skipped = 0
    while params and skipped < 2 and params[0].kind in positional:  # prompts, completions
        params.pop(0)
        skipped += 1
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return ColumnParams(named=tuple(p.name for p in named),
                        required=tuple(p.name for p in named if p.default is inspect.Parameter.empty),
                        any=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


def column_kwargs(fn: Callable, columns: Mapping[str, Sequence[Any]] | None) -> dict[str, Sequence[Any]]:
    """The keyword arguments `fn` takes out of `columns` (`{name: one value per completion}`)."""
    if not columns:
        return {}
    params = column_params(fn)
    if params.any:
        return dict(columns)
    return {name: columns[name] for name in params.named if name in columns}


def record_columns(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A record's columns: its fields but the prompt."""
    return {k: v for k, v in fields.items() if k != PROMPT_FIELD}


def check_columns(fn: Callable, setting: str, records: Sequence[Mapping[str, Any]], wheres: Sequence[str]) -> None:
    """`DataError` naming the first record (`wheres[i]`, its file and line), the field and the function, when `fn`
    (named by `setting`, e.g. `model.reward_fn (my_rewards:reward)`) requires a field that record lacks."""
    required = column_params(fn).required
    for fields, where in zip(records, wheres):
        for name in required:
            if name not in fields:
                raise DataError(f"{where}: {setting} takes the field {name!r}, which this record lacks "
                                f"(its fields: {sorted([PROMPT_FIELD, *fields])})")


def completion_columns(rows: Sequence[Mapping[str, Any]], fn: Callable | None,
                       available: Collection[str]) -> dict[str, list[Any]] | None:
    """The columns `fn` takes, one value per completion: `rows` are the columns of each completion's prompt
    record, in the order of the completions; `available` every column of the dataset (a `**kwargs` function
    gets all of them at every step, None where a record lacks one). None when `fn` takes none."""
    if fn is None:
        return None
    params = column_params(fn)
    names = sorted(available) if params.any else [n for n in params.named if n in available]
    if not names:
        return None
    return {name: [row.get(name) for row in rows] for name in names}
