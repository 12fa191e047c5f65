"""The prompt records' fields reach the reward and gold functions by prompt id, one value per completion (real
engine, transformers generator): string and chat prompts, groups of num_generations, and the start check."""

from __future__ import annotations

import json

import pytest
from _runs import run_config
from transformers import AutoTokenizer

from rlhf_engine.common.config_io import to_dict
from rlhf_engine.data.prompts import read_prompts
from rlhf_engine.data.records import DataError
from rlhf_engine.engine.config import load_run_config
from rlhf_engine.engine.core import RLHFEngine
from tests.helpers import columns as recorded
from tests.helpers.chat import with_chat_template


def config(tmp_path, policy_dir, prompts, *, model: dict, ppo: dict | None = None, **engine):
    """The engine tests' small run with these model settings (and ppo ones), 32 prompt tokens."""
    base = to_dict(run_config(tmp_path, policy_dir, prompts, backend="transformers", mode="sync", **engine))
    base["model"].update(model)
    base["ppo"].update(ppo or {})
    base["data"]["max_prompt_length"] = 32
    del base["generator"]["sampling"]  # from the ppo section
    return load_run_config(None, base=base)


@pytest.fixture(scope="module")
def policy_dir(policy_dir, tmp_path_factory):
    """The engine tests' tiny policy with a chat template (chat prompts need one)."""
    return with_chat_template(policy_dir, tmp_path_factory.mktemp("chat") / "policy")


@pytest.fixture
def column_prompts(tmp_path):
    """12 records, every third a chat prompt, each with its own answer and number."""
    records = []
    for i in range(12):
        text = f"review {i}: the movie was"
        prompt = [{"role": "user", "content": text}] if i % 3 == 0 else text
        records.append({"prompt": prompt, "answer": f"a{i}", "n": i})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reward_and_gold_get_each_completions_record_fields(tmp_path, policy_dir, column_prompts,
                                                             assert_no_new_children):
    cfg = config(tmp_path, policy_dir, column_prompts, total_steps=2,
                 model={"reward_fn": "tests.helpers.columns:reward", "gold_fn": "tests.helpers.columns:gold"},
                 ppo={"advantage_estimator": "grpo", "num_generations": 2})
    recorded.CALLS.clear()
    with RLHFEngine(cfg) as engine:
        engine.train()
    assert_no_new_children()
    # what each record's prompt decodes to, as the reward functions see it
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = read_prompts(column_prompts, tokenizer, cfg.data.max_prompt_length)
    by_text = {tokenizer.decode(ids, skip_special_tokens=True): c for ids, c in zip(prompts.token_ids, prompts.columns)}
    assert len(by_text) == 12

    rewards = [c for c in recorded.CALLS if c["fn"] == "reward"]
    golds = [c for c in recorded.CALLS if c["fn"] == "gold"]
    assert len(rewards) == len(golds) == 2  # one call of each per step
    seen = set()
    for call in rewards + golds:
        assert len(call["prompts"]) == 8  # 4 prompts x 2 completions
        for i, text in enumerate(call["prompts"]):  # each completion gets its own prompt's fields
            assert call["answer"][i] == by_text[text]["answer"] and call["n"][i] == by_text[text]["n"], (i, text)
            seen.add(call["n"][i])
        # a prompt's fields are repeated for each of its completions, in the order of the completions
        assert call["n"][0::2] == call["n"][1::2]
    assert set(golds[0]) == {"fn", "prompts", "answer", "n"}  # **kwargs: every field
    assert len(seen) == 8 and any(n % 3 == 0 for n in seen)  # 8 distinct prompts in 2 steps, chat ones among them


def test_a_field_the_records_lack_fails_before_any_generator_starts(tmp_path, policy_dir, column_prompts,
                                                                    assert_no_new_children):
    cfg = config(tmp_path, policy_dir, column_prompts, total_steps=1,
                 model={"reward_fn": "tests.helpers.columns:needs_level"})
    engine = RLHFEngine(cfg)
    with pytest.raises(DataError) as e:
        engine.start()
    assert str(e.value) == (f"{column_prompts}:1: model.reward_fn (tests.helpers.columns:needs_level) takes the field "
                            "'level', which this record lacks (its fields: ['answer', 'n', 'prompt'])")
    assert engine._local is None and not list((tmp_path / "run").glob("generator*"))  # nothing was started
    assert_no_new_children()


@pytest.mark.parametrize("field, message", [
    ("n", "data.max_new_tokens_field 'n' must be an int >= 1, got 0"),  # record 1 holds n = 0
    ("answer", "data.max_new_tokens_field 'answer' must be an int >= 1, got 'a0'"),
    ("budget", "data.max_new_tokens_field 'budget' must be an int >= 1, got None"),
])
def test_a_budget_field_that_is_not_a_budget_fails_before_any_generator_starts(tmp_path, policy_dir, column_prompts,
                                                                              field, message):
    cfg = config(tmp_path, policy_dir, column_prompts, total_steps=1, model={"reward_fn": "rlhf_engine.demo:gold_scores"})
    cfg.data.max_new_tokens_field = field
    engine = RLHFEngine(cfg)
    with pytest.raises(DataError) as e:
        engine.start()
    assert str(e.value) == f"{column_prompts}:1: {message}"
    assert engine._local is None
