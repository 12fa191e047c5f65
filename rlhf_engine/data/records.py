"""Read raw records (one mapping per example) from JSONL/JSON files, Hugging Face datasets or lists.

Every record keeps where it came from (`file:line` or `name row i`) so that a bad field later on
can be reported precisely. Broken input raises `DataError` naming the place; with
`skip_invalid=True` the bad record is counted in a `DataStats` and dropped instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# File suffixes read without the `datasets` package; anything else needs it.
JSON_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_SKIPS = 5


class DataError(ValueError):
    """A record that cannot be used, with the place (file and line, or dataset row) and the field."""


@dataclass(frozen=True)
class Record:
    """One raw example: its fields and where it came from (`where`, e.g. `train.jsonl:17`)."""

    fields: Mapping[str, Any]
    where: str


@dataclass
class DataStats:
    """What happened to the examples of one dataset: nothing is dropped or cut without a count here.

    `skipped` counts bad records dropped because `skip_invalid` was set (the first few reasons are
    kept in `skip_reasons`); `truncated` counts sequences cut to `max_length`; `dropped_empty`
    counts examples with no trained token left after truncation.
    """

    name: str
    read: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    kept: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REPORTED_SKIPS:
            self.skip_reasons.append(reason)

    def summary(self) -> str:
        """One line for logs, e.g. `train: 1000 read, 998 kept, 2 skipped (bad data), 13 truncated`."""
        text = (f"{self.name}: {self.read} read, {self.kept} kept, {self.skipped} skipped (bad data), "
                f"{self.truncated} truncated to max_length, {self.dropped_empty} dropped (nothing left to train "
                "on after truncation)")
        if self.skip_reasons:
            text += "; first skipped: " + " | ".join(self.skip_reasons)
        return text

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/read": self.read, f"{prefix}/kept": self.kept, f"{prefix}/skipped": self.skipped,
                f"{prefix}/truncated": self.truncated, f"{prefix}/dropped_empty": self.dropped_empty}


def read_records(source: Any, stats: DataStats, *, skip_invalid: bool = False) -> list[Record]:
    """All records of `source`: a path (`.jsonl`, `.json`; other formats through `datasets` when
    installed), a Hugging Face `Dataset`, or any iterable of mappings. Counts into `stats.read`."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist")
        if path.suffix == ".jsonl":
            return _read_jsonl(path, stats, skip_invalid)
        if path.suffix == ".json":
            return _read_json(path, stats, skip_invalid)
        return _read_with_datasets(path, stats, skip_invalid)
    if isinstance(source, Mapping):
        raise DataError("a dataset must be a path or a sequence of records, got a single mapping")
    if not isinstance(source, Iterable):
        raise DataError("a dataset must be a path, a datasets.Dataset or a list of mappings,"
                        f" got {type(source).__name__}")
    name = type(source).__name__
    return _from_rows(source, name, stats, skip_invalid)


def _fail_or_skip(message: str, stats: DataStats, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise DataError(message)
    stats.skip(message)


def _read_jsonl(path: Path, stats: DataStats, skip_invalid: bool) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats.read += 1
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _fail_or_skip(f"{where}: not valid JSON ({e.msg} at column {e.colno})", stats, skip_invalid)
                continue
            if not isinstance(obj, dict):
                _fail_or_skip(f"{where}: a record must be a JSON object, got {type(obj).__name__}", stats, skip_invalid)
                continue
            records.append(Record(obj, where))
    return records


def _read_json(path: Path, stats: DataStats, skip_invalid: bool) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, list):
        raise DataError(f"{path}: a .json dataset must hold a list of objects, got {type(obj).__name__}")
    return _from_rows(obj, str(path), stats, skip_invalid, row_word="item")


def _read_with_datasets(path: Path, stats: DataStats, skip_invalid: bool) -> list[Record]:
    builders = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
    if path.suffix not in builders:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json"
                        f" or (with the `datasets` package) {', '.join(builders)}")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: reading {path.suffix} files needs the `datasets` package "
                        "(pip install datasets); .jsonl and .json work without it") from e
    ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    return _from_rows(ds, str(path), stats, skip_invalid)


def _from_rows(rows: Iterable[Any], name: str, stats: DataStats, skip_invalid: bool,
               row_word: str = "row") -> list[Record]:
    records = []
    for i, row in enumerate(rows):
        stats.read += 1
        where = f"{name} {row_word} {i}"
        if not isinstance(row, Mapping):
            _fail_or_skip(f"{where}: a record must be a mapping, got {type(row).__name__}", stats, skip_invalid)
            continue
        records.append(Record(row, where))
    return records
