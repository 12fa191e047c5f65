"""Several reward functions as one: a weighted sum with each term's output checked.

    reward = weighted((exact_match(key), 1.0), (format_reward, 0.1))
    reward(["2 + 3 ="], [" #### 5"])  -> [1.1]
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""fn(prompts, completions) -> one float per completion (the `model.reward_fn` signature)."""


def weighted(*terms: tuple[RewardFn, float]) -> Callable[[list[str], list[str]], list[float]]:
    """A reward function returning `sum_i weight_i * term_i(prompts, completions)` per completion.

    A term that returns the wrong number of scores raises a ValueError naming the term; a non-finite
    score (NaN, inf) makes that completion's total NaN, which the trainer drops and counts
    (`env/nonfinite_rewards`) instead of training on it.
    """
    if not terms:
        raise ValueError("weighted() needs at least one (reward_fn, weight) term")
    for i, term in enumerate(terms):
        if not (isinstance(term, tuple) and len(term) == 2 and callable(term[0])):
            raise ValueError(f"term {i} ({term!r}) must be a (reward_fn, weight) pair")
        if not isinstance(term[1], (int, float)) or not math.isfinite(term[1]):
            raise ValueError(f"term {i} ({_name(term[0])}) has weight {term[1]!r}; weights must be finite numbers")

    def weighted_reward(prompts: list[str], completions: list[str]) -> list[float]:
        total = [0.0] * len(completions)
        for i, (fn, weight) in enumerate(terms):
            scores = [float(s) for s in fn(prompts, completions)]
            if len(scores) != len(completions):
                raise ValueError(f"reward term {i} ({_name(fn)}) returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
            # a NaN or inf score stays non-finite in the total (0 * inf is NaN too)
            total = [t + weight * s if math.isfinite(s) else math.nan for t, s in zip(total, scores)]
        return total

    return weighted_reward


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
