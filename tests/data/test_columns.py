"""Record fields as reward-function keyword arguments: which a function takes, what it gets, the start check."""

import copy
import functools
import json

import pytest

from rlhf_engine.data.columns import ColumnParams, check_columns, column_kwargs, column_params, completion_columns
from rlhf_engine.data.prompts import read_prompts
from rlhf_engine.data.records import DataError
from tests.helpers.chat import CHAT_TEMPLATE


def two_args(prompts, completions):
    return [0.0] * len(completions)


def with_answer(prompts, completions, answer, level=1):
    return [0.0] * len(completions)


def with_kwargs(prompts, completions, **columns):
    return [0.0] * len(completions)


def test_column_params_read_the_signature():
    assert column_params(two_args) == ColumnParams()
    assert column_params(with_answer) == ColumnParams(named=("answer", "level"), required=("answer",))
    assert column_params(with_kwargs) == ColumnParams(any=True)
    assert column_params(lambda p, c, *, answer: None) == ColumnParams(named=("answer",), required=("answer",))
    assert column_params(functools.partial(with_answer, level=2)).required == ("answer",)
    assert column_params(len) == ColumnParams(named=(), required=(), any=False)  # builtin: one argument, no columns


def test_column_kwargs_pass_only_what_a_function_names():
    columns = {"answer": ["4", "4", "9"], "level": [1, 1, 2], "source": ["a", "a", "b"]}
    assert column_kwargs(two_args, columns) == {}
    assert column_kwargs(with_answer, columns) == {"answer": ["4", "4", "9"], "level": [1, 1, 2]}
    assert column_kwargs(with_kwargs, columns) == columns
    assert column_kwargs(with_kwargs, None) == {}


def test_completion_columns_follow_the_rows_and_fill_none():
    rows = [{"answer": "4"}, {"answer": "4"}, {"answer": "9", "source": "b"}]  # prompt 0 twice, then prompt 1
    available = {"answer", "source", "level"}
    assert completion_columns(rows, two_args, available) is None
    assert completion_columns(rows, with_answer, available) == {"answer": ["4", "4", "9"], "level": [None] * 3}
    # a field no record has is not passed: the parameter's default applies
    assert completion_columns(rows, with_answer, {"answer", "source"}) == {"answer": ["4", "4", "9"]}
    assert completion_columns(rows, with_kwargs, available) == {
        "answer": ["4", "4", "9"], "level": [None, None, None], "source": [None, None, "b"]}
    assert completion_columns(rows, None, available) is None


def test_check_columns_names_record_field_and_function():
    rows = [{"answer": "4"}, {"level": 2}]
    check_columns(with_kwargs, "model.reward_fn (m:f)", rows, ["p.jsonl:1", "p.jsonl:2"])  # needs nothing
    with pytest.raises(DataError) as e:
        check_columns(with_answer, "model.reward_fn (m:f)", rows, ["p.jsonl:1", "p.jsonl:2"])
    assert str(e.value) == ("p.jsonl:2: model.reward_fn (m:f) takes the field 'answer', which this record lacks "
                            "(its fields: ['level', 'prompt'])")


def test_read_prompts_keeps_each_records_columns(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path / "p.jsonl"
    records = [{"prompt": "two plus two", "answer": "4"},
               {"prompt": [{"role": "user", "content": "three squared"}], "answer": "9", "meta": {"k": [1]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = read_prompts(path, tokenizer, max_prompt_length=64)
    assert prompts.columns == [{"answer": "4"}, {"answer": "9", "meta": {"k": [1]}}]
    assert prompts.wheres == [f"{path}:1", f"{path}:2"] and prompts.column_names == {"answer", "meta"}
    assert len(prompts) == 2 and prompts.token_ids[0] == tokenizer("two plus two")["input_ids"]


def test_chat_prompts_need_a_chat_template(tmp_path, tokenizer):
    # the SFT fallback format ("user: ...") would be what the policy samples from: an error, not a guess
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    assert not tokenizer.chat_template
    with pytest.raises(DataError) as e:
        read_prompts(path, tokenizer, max_prompt_length=64)
    assert str(e.value) == (f"{path}:2: field 'prompt' holds chat messages but the policy's tokenizer has no chat "
                            "template: give the prompt as a string, or a model whose tokenizer has one")
