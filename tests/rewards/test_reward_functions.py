"""AnswerKey, exact_match, format_reward and the weighted combinator, with specific scores."""

import json
import math

import pytest

from rlhf_engine.rewards import AnswerKey, exact_match, format_reward, weighted
from rlhf_engine.models.reward_scoring import function_scores

PROMPTS = ["Tom has 2 apples and gets 3 more. How many?", "What is 10 - 14?", "Half of 3?"]
KEY = AnswerKey({p: a for p, a in zip(PROMPTS, ["5", "-4", "3/2"])})


def test_answer_key_from_jsonl_and_lookup(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("1 + 1 =", 2), ("2 + 2 =", "4")]))
    key = AnswerKey.from_jsonl(path)
    assert len(key) == 2
    assert key(["1 + 1 =", " 2 + 2 = "]) == ["2", "4"]  # numbers become strings; whitespace ignored
    assert key(["<s>user: 2 + 2 =\nassistant:"]) == ["4"]  # the key's prompt inside a chat template
    with pytest.raises(KeyError, match=r"no reference answer for prompt '3 \+ 3 =' \(2 prompts in the answer key\)"):
        key(["3 + 3 ="])
    path.write_text('{"question": "1 + 1 =", "answer": 2}\n')
    with pytest.raises(ValueError, match=r"problems.jsonl:1: needs a string 'prompt' and an 'answer' field"):
        AnswerKey.from_jsonl(path)


def test_exact_match_scores():
    completions = [" 2 + 3 = 5\n#### 5", " #### -4.0", " \\boxed{1.5}"]
    assert exact_match(KEY)(PROMPTS, completions) == [1.0, 1.0, 1.0]
    wrong = [" #### 6", " the answer is -4", " \\boxed{3/4}"]  # wrong, no marker, wrong
    assert exact_match(KEY)(PROMPTS, wrong) == [0.0, 0.0, 0.0]


def test_format_reward_scores():
    assert format_reward(PROMPTS, [" #### 7", " \\boxed{x}", " 7", " #### ", " \\boxed{7"]) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_weighted_sums_terms():
    reward = weighted((exact_match(KEY), 1.0), (format_reward, 0.25))
    # correct and formatted: 1 + 0.25; formatted but wrong: 0.25; neither: 0
    assert reward(PROMPTS, [" #### 5", " #### 4", " -4"]) == [1.25, 0.25, 0.0]
    assert weighted((format_reward, -2))(PROMPTS[:1], [" #### 1"]) == [-2.0]


def test_weighted_passes_non_finite_scores_on_as_nan():
    def shaky(prompts, completions):
        return [1.0, math.inf, math.nan]

    out = weighted((format_reward, 1.0), (shaky, 0.5))(PROMPTS, [" #### 1", " #### 2", " 3"])
    assert out[0] == 1.5 and math.isnan(out[1]) and math.isnan(out[2])


def test_weighted_rejects_bad_terms_and_wrong_lengths():
    with pytest.raises(ValueError, match="at least one"):
        weighted()
    with pytest.raises(ValueError, match=r"term 0 \(format_reward\) has weight nan"):
        weighted((format_reward, math.nan))
    with pytest.raises(ValueError, match="must be a \\(reward_fn, weight\\) pair"):
        weighted(format_reward)

    def short(prompts, completions):
        return [1.0]

    with pytest.raises(ValueError, match=r"reward term 1 \(.*short\) returned 1 scores for 3 completions"):
        weighted((format_reward, 1.0), (short, 1.0))(PROMPTS, ["a", "b", "c"])


def test_reward_fn_of_the_wrong_length_names_the_setting():
    with pytest.raises(ValueError, match=r"model.reward_fn .*returned 2 scores for 3 completions"):
        function_scores(lambda p, c: [1.0, 2.0], PROMPTS, ["a", "b", "c"])
