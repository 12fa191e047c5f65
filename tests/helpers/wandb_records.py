"""Read a local W&B run file (`run-*.wandb`) back: W&B's own record protobufs in a LevelDB-style log.

The file: a 7-byte header (`:W&B`, magic 0xBEE1, version), then 32 KiB blocks of chunks, each
`crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last) | data`; a
block's tail shorter than a chunk header is padding. The data of a record is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK = 32 * 1024
_HEADER = 7


def _chunks_joined(buf: bytes) -> Iterator[bytes]:
    if buf[:4] != b":W&B":
        raise ValueError(f"not a W&B run file: header {buf[:7]!r}")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(buf):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + _HEADER])
        data = buf[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            yield data
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            yield pending + data


def read_run(path: str | Path) -> dict[str, Any]:
    """`{"config": {key: value}, "history": [row, ...]}` of the run file at `path` (each history row a dict
    of the logged keys, with W&B's `_step`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for data in _chunks_joined(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return {"config": config, "history": history}
