"""Rewards a program can check: the final answer against a reference, and the answer's format.

Each is, or builds, a `model.reward_fn` (prompts and completions decoded without special tokens; one float
per completion). The reference answer comes from the prompt's own record (its `answer` field, a keyword
argument: `rlhf_engine.data.columns`), for string and chat prompts alike:

    reward_fn: rlhf_engine.rewards:correct               # {"prompt": ..., "answer": "42"} per line
    reward = weighted((correct, 1.0), (format_reward, 0.1))

The fallback, for records without the answer or code that sees only the text: an `AnswerKey` looks the
answer up by the prompt's text (string prompts only): `exact_match(AnswerKey.from_jsonl("problems.jsonl"))`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

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
        """The key of a JSONL file with a string `prompt_field` and an `answer_field` on every line. (Chat
        prompts have no text to look up: take the answer from the record instead, `correct`.)"""
        answers = {}
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record.get(prompt_field), list):
                    raise ValueError(f"{path}:{line_no}: {prompt_field!r} is chat messages, which an AnswerKey cannot "
                                     f"look up by text: let the reward take the record's {answer_field!r} field "
                                     f"instead (reward_fn: rlhf_engine.rewards:correct, or exact_match())")
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


def exact_match(references: Callable[[list[str]], list[str]] | None = None) -> Callable[..., list[float]]:
    """A reward function: 1.0 when a completion's final answer (`#### 42` or `\\boxed{42}`) equals the
    reference answer of its prompt (as numbers when both are numbers: `42.0` == `42` == `$42.`), else 0.0.

    references None: the reference is the prompt record's `answer` field (`fn(prompts, completions, answer)`,
    `rlhf_engine.data.columns`; a run whose records lack it fails when the prompts are read); or a function
    prompts -> their answers (an `AnswerKey`: looked up by the prompt's text, `fn(prompts, completions)`).
    """
    if references is None:
        def exact_match_reward(prompts: list[str], completions: list[str], answer: list[Any]) -> list[float]:
            if len(answer) != len(completions):
                raise ValueError(f"{len(answer)} answers for {len(completions)} completions")
            return _matches(completions, [str(a) for a in answer])

        return exact_match_reward

    def exact_match_key_reward(prompts: list[str], completions: list[str]) -> list[float]:
        refs = references(prompts)
        if len(refs) != len(prompts):
            raise ValueError(f"the reference function returned {len(refs)} answers for {len(prompts)} prompts")
        return _matches(completions, refs)

    return exact_match_key_reward


def _matches(completions: list[str], references: list[str]) -> list[float]:
    return [float(answers_match(extract_answer(c), r)) for c, r in zip(completions, references)]


correct = exact_match()
"""`model.reward_fn: rlhf_engine.rewards:correct`: 1.0 when the final answer equals the record's `answer`."""


def format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when a completion states a final answer in a form `extract_answer` finds (`#### ...` or a closed
    `\\boxed{...}`, non-empty), else 0.0. A reward function itself (`rlhf_engine.rewards:format_reward`)."""
    return [float(extract_answer(c) is not None) for c in completions]
