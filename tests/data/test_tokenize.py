"""Tokenization: labels -100 on prompts, chat rendering, counted truncation, preference pairs."""

import pytest

from rlhf_engine.data import IGNORE_INDEX, build_preference_dataset, build_sft_dataset, render_chat
from tests.helpers.chat import CHAT_TEMPLATE as TEMPLATE


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def templated(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    return tok


def test_prompt_tokens_are_masked_and_eos_is_trained(tokenizer):
    (ex,), stats = build_sft_dataset([{"prompt": "the cat likes", "completion": " a red apple."}], tokenizer,
                                     max_length=64)
    p, c = ids(tokenizer, "the cat likes"), ids(tokenizer, " a red apple.")
    eos = tokenizer.eos_token_id
    assert ex.input_ids == p + c + [eos]
    assert ex.labels == [IGNORE_INDEX] * len(p) + c + [eos]
    assert (stats.read, stats.kept, stats.truncated) == (1, 1, 0)


def test_text_format_trains_every_token(tokenizer):
    (ex,), _ = build_sft_dataset([{"text": "a dog eats bread."}], tokenizer, max_length=64)
    assert ex.labels == ex.input_ids == ids(tokenizer, "a dog eats bread.") + [tokenizer.eos_token_id]


def test_messages_fallback_format_trains_assistant_turns_only(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good day"},
            {"role": "user", "content": "and"}, {"role": "assistant", "content": "bad day"}]
    assert render_chat(tokenizer, msgs, add_generation_prompt=False) == \
        "user: hi\nassistant: good day</s>user: and\nassistant: bad day</s>"
    (ex,), _ = build_sft_dataset([{"messages": msgs}], tokenizer, max_length=128)
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    assert trained == ids(tokenizer, "good day") + [eos] + ids(tokenizer, "bad day") + [eos]
    assert tokenizer.decode(ex.input_ids) == render_chat(tokenizer, msgs, add_generation_prompt=False)


def test_messages_with_chat_template(templated):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good day"}]
    (ex,), _ = build_sft_dataset([{"messages": msgs}], templated, max_length=128)
    assert templated.decode(ex.input_ids) == "<s>user\nhi</s>\n<s>assistant\ngood day</s>\n"
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert templated.decode(trained) == "good day</s>\n"


def test_conversational_prompt_completion(templated):
    rec = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yes"}]}
    (ex,), _ = build_sft_dataset([rec], templated, max_length=128)
    prompt = [t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX]
    assert templated.decode(prompt) == "<s>user\nhi</s>\n<s>assistant\n"


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer):
    long = {"prompt": "the cat", "completion": " sees " + "a red apple " * 10 + "."}
    only_prompt = {"prompt": "the cat likes the blue sky today again", "completion": " yes."}
    fits = {"prompt": "a", "completion": " b."}
    n_prompt = len(ids(tokenizer, only_prompt["prompt"]))
    examples, stats = build_sft_dataset([long, only_prompt, fits], tokenizer, max_length=n_prompt)
    assert (stats.read, stats.truncated, stats.dropped_empty, stats.kept) == (3, 2, 1, 2)
    assert len(examples[0].input_ids) == n_prompt
    assert "2 truncated to max_length, 1 dropped" in stats.summary()


def test_preference_pair_labels_and_margin(tokenizer):
    rec = {"prompt": "the cat likes", "chosen": " good.", "rejected": " bad bad.", "margin": 2}
    (pair,), _ = build_preference_dataset([rec], tokenizer, max_length=64)
    p, eos = ids(tokenizer, "the cat likes"), tokenizer.eos_token_id
    assert pair.chosen_ids == p + ids(tokenizer, " good.") + [eos]
    assert pair.rejected_labels == [IGNORE_INDEX] * len(p) + ids(tokenizer, " bad bad.") + [eos]
    assert pair.margin == 2.0


def test_preference_messages_with_implicit_prompt(tokenizer):
    user = {"role": "user", "content": "hi"}
    rec = {"chosen": [user, {"role": "assistant", "content": "good"}],
           "rejected": [user, {"role": "assistant", "content": "bad"}]}
    (pair,), _ = build_preference_dataset([rec], tokenizer, max_length=64)
    prompt = [t for t, lab in zip(pair.chosen_ids, pair.chosen_labels) if lab == IGNORE_INDEX]
    assert tokenizer.decode(prompt) == "user: hi\nassistant: "
    assert tokenizer.decode([t for t in pair.rejected_labels if t != IGNORE_INDEX]) == "bad</s>"
    assert pair.margin is None
