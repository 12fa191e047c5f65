"""Verifiable rewards for `model.reward_fn`: programs that check a completion's final answer.

Every reward function has the `model.reward_fn` signature `fn(prompts, completions, **fields) -> one float
per completion`, where `fields` are the prompt records' other fields it names (`answer=[...]`, one value per
completion: `rlhf_engine.data.columns`). Name one in the config (`reward_fn: rlhf_engine.rewards:correct`)
or build yours in a small module (`reward_fn: my_rewards:reward`):

    from rlhf_engine.rewards import correct, format_reward, weighted

    reward = weighted((correct, 1.0), (format_reward, 0.1))   # records: {"prompt": ..., "answer": "42"}

- `answers`: `extract_answer` (`#### 42`, `\\boxed{42}`), `parse_number`, `answers_match`;
- `verifiable`: `correct` (the record's `answer`), `exact_match`, `format_reward`, and `AnswerKey`, the
  fallback that finds the answer by the prompt's text;
- `combine`: `weighted`, a weighted sum of reward functions (each term gets the fields it names).
"""

from rlhf_engine.rewards.answers import answers_match, extract_answer, parse_number
from rlhf_engine.rewards.combine import weighted
from rlhf_engine.rewards.verifiable import AnswerKey, correct, exact_match, format_reward

__all__ = ["AnswerKey", "answers_match", "correct", "exact_match", "extract_answer", "format_reward", "parse_number",
           "weighted"]
