"""Datasets for the SFT, reward and DPO stages: reading records, formats, tokenization, batching,
and the synthetic sentiment task of the demo."""

from rlhf_engine.data.collate import PackedRow, pack_sequences, packed_batch, preference_batch, sft_batch
from rlhf_engine.data.formats import render_chat
from rlhf_engine.data.records import DataError, DataStats, Record, read_records
from rlhf_engine.data.tokenize import (
                                       IGNORE_INDEX,
                                       TokenizedPair,
                                       TokenizedSFT,
                                       build_preference_dataset,
                                       build_sft_dataset,
)

__all__ = [
    "DataError", "DataStats", "IGNORE_INDEX", "PackedRow", "Record", "TokenizedPair", "TokenizedSFT",
    "build_preference_dataset", "build_sft_dataset", "pack_sequences", "packed_batch", "preference_batch",
    "read_records", "render_chat", "sft_batch",
]
