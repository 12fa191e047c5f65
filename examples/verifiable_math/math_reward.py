"""The recipe's reward: `model.reward_fn: math_reward:reward` (with this folder on PYTHONPATH).

The answer key is `problems.jsonl` beside this file; for your own data, build the key from your file.
"""

from pathlib import Path

from rlhf_engine.rewards import AnswerKey, exact_match, format_reward, weighted

KEY = AnswerKey.from_jsonl(Path(__file__).with_name("problems.jsonl"))

correct = exact_match(KEY)
"""1.0 for a right final answer: the accuracy (`model.gold_fn: math_reward:correct` logs it as env/gold_mean)."""

reward = weighted((correct, 1.0), (format_reward, 0.1))
"""What GRPO maximises: right answers, and a little for stating one in the `#### N` format."""
