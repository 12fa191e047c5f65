"""Rewards a program can check: the final answer against a reference, and the answer's format.

Both have, or build, the `model.reward_fn` signature `fn(prompts, completions) -> one float each`
(prompts and completions decoded without special tokens):

    key = AnswerKey.from_jsonl("problems.jsonl")        # {"prompt": ..., "answer": "42"} per line
    correct = exact_match(key)                           # 1.0 when the final answer equals the key's
    reward = weighted((correct, 1.0), (format_reward, 0.1))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

from rlhf_engine.rewards.answers import answers_match, extract_answer


class AnswerKey:
    """The reference answer of each prompt, looked up by the prompt's text.

    A prompt the trainer decodes is looked up as is (surrounding whitespace ignored); failing that, the
    longest key contained in it is used (chat templates wrap the prompt in more text). A prompt with no
    answer is an error: the data file and the key must come from the same records, and prompts must not
    be cut by `data.max_prompt_length`.
    """

    def __init__(self, answers: Mapping[str, str]) -> None:
        if not answers:
            raise ValueError("AnswerKey needs at least one (prompt, answer) pair")
        self._answers = {p.strip(): str(a) for p, a in answers.items()}
        self._by_length = sorted(self._answers, key=len, reverse=True)

    @classmethod
    def from_jsonl(cls, path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer") -> "AnswerKey":
        """The key of a JSONL file with a string `prompt_field` and an `answer_field` on every line."""
        answers = {}
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record.get(prompt_field), str) or answer_field not in record:
                    raise ValueError(f"{path}:{line_no}: needs a string {prompt_field!r} and an {answer_field!r} field "
                                     f"(has {sorted(record)})")
                answers[record[prompt_field]] = str(record[answer_field])
        return cls(answers)

    @property
    def prompts(self) -> list[str]:
        """The prompts of the key, in the order they were given."""
        return list(self._answers)

    def __len__(self) -> int:
        return len(self._answers)

    def __call__(self, prompts: list[str]) -> list[str]:
        """The reference answer of each prompt."""
        return [self._lookup(p) for p in prompts]

    def _lookup(self, prompt: str) -> str:
        key = prompt.strip()
        if key in self._answers:
            return self._answers[key]
        for known in self._by_length:
            if known in key:
                return self._answers[known]
        raise KeyError(f"no reference answer for prompt {prompt[:200]!r} ({len(self)} prompts in the answer key): "
                       "is data.prompts the file the key was built from, and no prompt cut by data.max_prompt_length?")


def exact_match(references: Callable[[list[str]], list[str]]) -> Callable[[list[str], list[str]], list[float]]:
    """A reward function: 1.0 when a completion's final answer (`#### 42` or `\\boxed{42}`) equals the
    reference answer of its prompt (as numbers when both are numbers: `42.0` == `42` == `$42.`), else 0.0.

    references: prompts -> their answers (an `AnswerKey`, or any function of that form).
    """

    def exact_match_reward(prompts: list[str], completions: list[str]) -> list[float]:
        refs = references(prompts)
        if len(refs) != len(prompts):
            raise ValueError(f"the reference function returned {len(refs)} answers for {len(prompts)} prompts")
        return [float(answers_match(extract_answer(c), r)) for c, r in zip(completions, refs)]

    return exact_match_reward


def format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when a completion states a final answer in a form `extract_answer` finds (`#### ...` or a closed
    `\\boxed{...}`, non-empty), else 0.0. A reward function itself (`rlhf_engine.rewards:format_reward`)."""
    return [float(extract_answer(c) is not None) for c in completions]
