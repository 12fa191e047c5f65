"""Several reward functions as one: a weighted sum with each term's output checked.

    reward = weighted((correct, 1.0), (format_reward, 0.1))
    reward(["2 + 3 ="], [" #### 5"], answer=["5"])  -> [1.1]

Each term gets the record fields it takes (`rlhf_engine.data.columns`); the sum declares them all in its
signature, so a field a term needs and the records lack is reported when the run reads its prompts.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

from rlhf_engine.data.columns import column_kwargs, column_params

RewardFn = Callable[..., Sequence[float]]
"""fn(prompts, completions, **the record fields it names) -> one float per completion (`model.reward_fn`)."""


def weighted(*terms: tuple[RewardFn, float]) -> Callable[..., list[float]]:
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

    def weighted_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        total = [0.0] * len(completions)
        for i, (fn, weight) in enumerate(terms):
            scores = [float(s) for s in fn(prompts, completions, **column_kwargs(fn, columns))]
            if len(scores) != len(completions):
                raise ValueError(f"reward term {i} ({_name(fn)}) returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
            # a NaN or inf score stays non-finite in the total (0 * inf is NaN too)
            total = [t + weight * s if math.isfinite(s) else math.nan for t, s in zip(total, scores)]
        return total

    weighted_reward.__signature__ = _union_signature([fn for fn, _ in terms])
    return weighted_reward


def _union_signature(fns: list[Callable]) -> inspect.Signature:
    """`(prompts, completions, *, <each field a term names>, **columns if a term takes any)`: a field is
    required when some term requires it."""
    params = [column_params(fn) for fn in fns]
    required = {n for p in params for n in p.required}
    names = sorted({n for p in params for n in p.named})
    kw = inspect.Parameter.KEYWORD_ONLY
    out = [inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD),
           inspect.Parameter("completions", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    out += [inspect.Parameter(n, kw) if n in required else inspect.Parameter(n, kw, default=None) for n in names]
    if any(p.any for p in params):
        out.append(inspect.Parameter("columns", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(out)


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
