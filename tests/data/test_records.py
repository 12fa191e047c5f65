"""Reading records: JSONL/JSON/lists/datasets, and bad data reported with file, line and field."""

import json

import pytest

from rlhf_engine.data import DataError, build_preference_dataset, build_sft_dataset
from rlhf_engine.data.records import DataStats, read_records


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_records_know_their_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a"}), "", json.dumps({"text": "b"})])
    stats = DataStats("train")
    records = read_records(path, stats)
    assert [r.fields["text"] for r in records] == ["a", "b"]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]  # the blank line 2 is not a record
    assert stats.read == 2


def test_broken_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a"}), '{"text": "b"', json.dumps({"text": "c"})])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        read_records(path, DataStats("train"))


def test_non_object_line_is_an_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['["text", "a"]'])
    with pytest.raises(DataError, match=rf"{path}:1: a record must be a JSON object, got list"):
        read_records(path, DataStats("train"))


@pytest.mark.parametrize("record, message", [
    ({"prompt": "the cat"}, r":2: missing field 'completion'"),
    ({"prompt": "the cat", "completion": "   "}, r":2: field 'completion' is an empty string"),
    ({"prompt": "the cat", "completion": 7}, r":2: fields 'prompt' and 'completion' must both be strings or both "
                                            r"message lists, got str and int"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, r":2: field 'messages'\[1\] is missing 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r":2: field 'messages' has no assistant message"),
    ({"text": ["a"]}, r":2: field 'text' must be a string, got list"),
    ({"answer": "x"}, r":2: no SFT fields; expected 'prompt'\+'completion', 'messages' or 'text', found \['answer'\]"),
])
def test_bad_sft_record_names_file_line_and_field(tmp_path, tokenizer, record, message):
    good = {"prompt": "the cat", "completion": " sees a dog."}
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(good), json.dumps(record)])
    with pytest.raises(DataError, match=f"{path}{message}"):
        build_sft_dataset(path, tokenizer, max_length=64)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, r":1: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r":1: field 'chosen' is an empty string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, r":1: field 'margin' must be a number, got str"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     r":1: 'prompt', 'chosen' and 'rejected' must all be strings or all message lists"),
])
def test_bad_preference_record_names_file_line_and_field(tmp_path, tokenizer, record, message):
    path = write_lines(tmp_path / "pref.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=f"{path}{message}"):
        build_preference_dataset(path, tokenizer, max_length=64)


def test_skip_invalid_counts_and_keeps_the_good_records(tmp_path, tokenizer):
    lines = [json.dumps({"prompt": "the cat", "completion": " sees a dog."}), "{broken", json.dumps({"prompt": "x"}),
             json.dumps({"text": "a dog eats."})]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    examples, stats = build_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)
    assert (len(examples), stats.read, stats.kept, stats.skipped) == (2, 4, 2, 2)
    assert f"{path}:2: not valid JSON" in stats.skip_reasons[0]
    assert f"{path}:3: missing field 'completion'" in stats.skip_reasons[1]
    assert "2 skipped (bad data)" in stats.summary()


def test_all_records_skipped_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", ["{broken"])
    with pytest.raises(DataError, match="has no usable example"):
        build_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)


def test_json_list_file_and_python_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    records = read_records(path, DataStats("t"))
    assert [r.where for r in records] == [f"{path} item 0", f"{path} item 1"]
    records = read_records([{"text": "a"}, 3], DataStats("t"), skip_invalid=True)
    assert [r.where for r in records] == ["list row 0"]
    with pytest.raises(DataError, match="list row 1: a record must be a mapping, got int"):
        read_records([{"text": "a"}, 3], DataStats("t"))


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl", DataStats("t"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'"):
        read_records(tmp_path / "d.xml", DataStats("t"))


def test_hf_dataset_object(tokenizer):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "the cat", "completion": " sees a dog."}, {"prompt": "", "completion": "x"}])
    with pytest.raises(DataError, match=r"Dataset row 1: field 'prompt' is an empty string"):
        build_sft_dataset(ds, tokenizer, max_length=64)


def test_csv_file_through_datasets(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    path = tmp_path / "sft.csv"
    path.write_text("prompt,completion\nthe cat,\" sees a dog.\"\na dog,\n")
    with pytest.raises(DataError, match=rf"{path} row 1: field 'completion' is null"):
        build_sft_dataset(path, tokenizer, max_length=64)
    examples, stats = build_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)
    assert (stats.read, stats.kept, stats.skipped) == (2, 1, 1)
