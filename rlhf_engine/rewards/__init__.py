"""Verifiable rewards for `model.reward_fn`: programs that check a completion's final answer.

Every reward function has the `model.reward_fn` signature `fn(prompts, completions) -> one float per
completion`. Build yours in a small module and name it in the config (`reward_fn: my_rewards:reward`):

    from rlhf_engine.rewards import AnswerKey, exact_match, format_reward, weighted

    key = AnswerKey.from_jsonl("problems.jsonl")            # {"prompt": ..., "answer": "42"}
    reward = weighted((exact_match(key), 1.0), (format_reward, 0.1))

- `answers`: `extract_answer` (`#### 42`, `\\boxed{42}`), `parse_number`, `answers_match`;
- `verifiable`: `AnswerKey`, `exact_match`, `format_reward`;
- `combine`: `weighted`, a weighted sum of reward functions.
"""

from rlhf_engine.rewards.answers import answers_match, extract_answer, parse_number
from rlhf_engine.rewards.combine import weighted
from rlhf_engine.rewards.verifiable import AnswerKey, exact_match, format_reward

__all__ = ["AnswerKey", "answers_match", "exact_match", "extract_answer", "format_reward", "parse_number", "weighted"]
