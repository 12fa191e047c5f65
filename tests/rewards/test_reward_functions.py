"""AnswerKey, exact_match, format_reward and the weighted combinator, with specific scores."""

import json
import math

import pytest

from rlhf_engine.models.reward_scoring import function_scores
from rlhf_engine.rewards import AnswerKey, exact_match, format_reward, weighted

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


def test_correct_reads_the_records_answer_per_completion():
    from rlhf_engine.rewards import correct

    # two completions of prompt 0 (answer 5), then two of prompt 1 (answer -4): the answers come per completion
    completions = [" #### 5", " #### 6", " \\boxed{-4.0}", " #### 5"]
    assert correct(PROMPTS[:1] * 2 + PROMPTS[1:2] * 2, completions, answer=["5", "5", "-4", "-4"]) == [1.0, 0.0, 1.0, 0.0]
    assert correct(["chat text"], [" #### 42"], answer=[42]) == [1.0]  # a JSON number compares as a number
    assert function_scores(correct, ["p"], [" #### 3/2"], {"answer": ["1.5"], "level": [2]}).tolist() == [1.0]
    with pytest.raises(ValueError, match="1 answers for 2 completions"):
        correct(PROMPTS[:2], [" #### 5", " #### 4"], answer=["5"])


def test_weighted_passes_each_term_the_fields_it_names():
    from rlhf_engine.data.columns import ColumnParams, column_params
    from rlhf_engine.rewards import correct

    seen = {}

    def by_level(prompts, completions, level, source=None):
        seen["level"], seen["source"] = level, source
        return [float(x) for x in level]

    reward = weighted((correct, 1.0), (format_reward, 0.25), (by_level, 0.5))
    # correct + format + level / 2: 1 + 0.25 + 1; 0 + 0.25 + 0.5; 0 + 0 + 1.5
    assert reward(PROMPTS, [" #### 5", " #### 4", " -4"], answer=["5", "-4", "3/2"], level=[2, 1, 3]) == [
        2.25, 0.75, 1.5]
    assert seen == {"level": [2, 1, 3], "source": None}
    # the sum declares what its terms take: answer and level required, source optional
    assert column_params(reward) == ColumnParams(named=("answer", "level", "source"), required=("answer", "level"))
    assert column_params(weighted((format_reward, 1.0))) == ColumnParams()  # two-argument terms: two arguments


def test_answer_key_refuses_chat_prompts_and_names_the_field_way(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: 'prompt' is chat messages, .*rlhf_engine.rewards:correct"):
        AnswerKey.from_jsonl(path)
