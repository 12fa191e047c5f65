"""The recipe's rewards (`model.reward_fn: arith_reward:reward`, this folder on PYTHONPATH).

Both read the record's `answer` field (`rlhf_engine.rewards.correct`): no answer key, no text lookup.
"""

from rlhf_engine.rewards import correct, format_reward, weighted

reward = weighted((correct, 1.0), (format_reward, 0.2))
"""What GRPO/PPO maximise: 1.0 for the right sum stated as `#### N`, 0.2 for stating any number that way."""

accuracy = correct
"""Strict accuracy: 1.0 only for the right sum in the checkable `#### N` format (`model.gold_fn`)."""
