"""Tokenize SFT and preference examples: labels are -100 on prompt tokens, truncation is counted.

Sequences longer than `max_length` are cut on the right (the prompt is kept, the end of the
completion goes) and counted in `DataStats.truncated`; an example left with no trained token is
dropped and counted in `DataStats.dropped_empty`. Nothing is cut or dropped without a count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_engine.data.formats import PreferenceText, TextExample, preference_example, sft_example
from rlhf_engine.data.records import DataError, DataStats, read_records

IGNORE_INDEX = -100
"""Label of a token that is not trained (the `ignore_index` of PyTorch's cross-entropy)."""

E = TypeVar("E")
T = TypeVar("T")


@dataclass(frozen=True)
class TokenizedSFT:
    """One SFT sequence: `input_ids` and `labels` of equal length, labels -100 where not trained."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as two full sequences (prompt + continuation) with labels on the continuation."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    margin: float | None


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _has_target(labels: list[int]) -> bool:
    # position 0 is never predicted (causal shift), so a label there alone trains nothing
    return any(t != IGNORE_INDEX for t in labels[1:])


def _truncate(ids: list[int], labels: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    if max_length is None or len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def tokenize_sft(example: TextExample, tokenizer, max_length: int | None, stats: DataStats) -> TokenizedSFT | None:
    """Token ids and labels of `example`, or None (counted) when truncation leaves nothing to train on."""
    ids: list[int] = []
    labels: list[int] = []
    for i, seg in enumerate(example.segments):
        toks = _encode(tokenizer, seg.text, special=(i == 0 and not example.rendered))
        ids += toks
        labels += toks if seg.trained else [IGNORE_INDEX] * len(toks)
    if not example.rendered and example.segments[-1].trained:
        ids += _eos(tokenizer)
        labels += _eos(tokenizer)
    ids, labels, cut = _truncate(ids, labels, max_length)
    stats.truncated += cut
    if not _has_target(labels):
        stats.dropped_empty += 1
        return None
    return TokenizedSFT(ids, labels)


def tokenize_pair(example: PreferenceText, tokenizer, max_length: int | None, stats: DataStats) -> TokenizedPair | None:
    """Both sequences of a preference pair, or None (counted) when truncation leaves either without a
    continuation token."""
    prompt = _encode(tokenizer, example.prompt, special=not example.rendered)
    out = []
    cut_any = False
    for text in (example.chosen, example.rejected):
        cont = _encode(tokenizer, text, special=not example.rendered and not prompt)
        if not example.rendered:
            cont += _eos(tokenizer)
        ids, labels, cut = _truncate(prompt + cont, [IGNORE_INDEX] * len(prompt) + cont, max_length)
        cut_any |= cut
        out.append((ids, labels))
    stats.truncated += cut_any
    if not all(_has_target(labels) for _, labels in out):
        stats.dropped_empty += 1
        return None
    (c_ids, c_labels), (r_ids, r_labels) = out
    return TokenizedPair(c_ids, c_labels, r_ids, r_labels, example.margin)


def build_sft_dataset(source: Any, tokenizer, *, max_length: int | None, skip_invalid: bool = False,
                      name: str = "train") -> tuple[list[TokenizedSFT], DataStats]:
    """Read, check and tokenize an SFT dataset (`source` as in `read_records`)."""
    return _build_dataset(source, tokenizer, sft_example, tokenize_sft, max_length=max_length,
                          skip_invalid=skip_invalid, name=name)


def build_preference_dataset(source: Any, tokenizer, *, max_length: int | None, skip_invalid: bool = False,
                             name: str = "train") -> tuple[list[TokenizedPair], DataStats]:
    """Read, check and tokenize a preference dataset (`source` as in `read_records`)."""
    return _build_dataset(source, tokenizer, preference_example, tokenize_pair, max_length=max_length,
                          skip_invalid=skip_invalid, name=name)


def _build_dataset(source: Any, tokenizer, parse: Callable[[Any, Any], E], tokenize: Callable[..., T | None], *,
                   max_length: int | None, skip_invalid: bool, name: str) -> tuple[list[T], DataStats]:
    """Records of `source` -> `parse(record, tokenizer)` (a `DataError` raises, or is counted and skipped
    with `skip_invalid`) -> `tokenize(example, tokenizer, max_length, stats)` (None: dropped, counted)."""
    stats = DataStats(name)
    out = []
    for record in read_records(source, stats, skip_invalid=skip_invalid):
        try:
            example = parse(record, tokenizer)
        except DataError as e:
            if not skip_invalid:
                raise
            stats.skip(str(e))
            continue
        tokenized = tokenize(example, tokenizer, max_length, stats)
        if tokenized is not None:
            out.append(tokenized)
    stats.kept = len(out)
    if not out:
        raise DataError(f"dataset {stats.name!r} has no usable example ({stats.summary()})")
    return out, stats
