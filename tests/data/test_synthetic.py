"""The synthetic sentiment task: gold reward, SFT records and gold-labelled preference pairs."""

import pytest

from rlhf_engine.data import synthetic


@pytest.mark.parametrize("text, gold", [
    (" today good nice.", 2.0),
    (" again bad love hate awful.", -2.0),
    (" slowly GOOD, goodness sad.", 0.0),  # case-insensitive whole words: "goodness" is not "good"
    (" at night.", 0.0),
])
def test_gold_reward(text, gold):
    assert synthetic.gold_reward(text) == gold


def test_sft_records_are_deterministic_and_balanced():
    recs = synthetic.sft_records(400, seed=3)
    assert recs == synthetic.sft_records(400, seed=3)
    golds = synthetic.gold_rewards([r["completion"] for r in recs])
    assert min(golds) >= -3 and max(golds) <= 3
    assert abs(sum(golds) / len(golds)) < 0.3  # SFT data has no sentiment preference
    assert all(r["completion"].startswith(" ") and r["completion"].endswith(".") for r in recs)
    assert len(synthetic.prompts(5, seed=1)) == 5


def test_preference_pairs_are_labelled_by_the_gold_reward():
    recs = synthetic.preference_records(200, seed=1, min_gap=2)
    for r in recs:
        gap = synthetic.gold_reward(r["chosen"]) - synthetic.gold_reward(r["rejected"])
        assert gap >= 2 and r["margin"] == gap
    with pytest.raises(ValueError, match=r"min_gap \(7\) must be in \(0, 6\]"):
        synthetic.preference_records(1, min_gap=7)


def test_task_words_tokenize_without_unknown_tokens(tokenizer):
    recs = synthetic.sft_records(50)
    for r in recs:
        ids = tokenizer(r["prompt"] + r["completion"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == r["prompt"] + r["completion"]
