"""A synthetic sentiment task with a known gold reward, for the demo and the stage tests.

Prompts are sentence starts from the grammar below ("the cat likes a red apple"), whose sentences
(`synthetic_sentences`) also train the tiny tokenizer of `rlhf_engine.models.tiny`; a completion goes on with an adverb and a few sentiment words (" today good sad love.").
The gold reward of a completion is the number of positive words minus the number of negative
words in it. SFT data draws sentiment words from both lists evenly (gold ≈ 0 on average: SFT
teaches the format); preference pairs are two completions of one prompt, the one with the higher
gold reward chosen. All words are in the tiny tokenizer's training corpus (`synthetic_sentences`),
so `build_tokenizer()` covers them.
"""

from __future__ import annotations

import random
import re

_SUBJECTS = ["the cat", "a dog", "my friend", "the robot", "our teacher", "the bird", "a child", "the farmer"]
_VERBS = ["likes", "sees", "finds", "makes", "wants", "gives", "eats", "paints"]
_OBJECTS = ["a red apple", "the blue sky", "some warm bread", "a green tree", "the old house", "many stars"]
_ADVERBS = ["today", "again", "slowly", "happily", "at night", "very well", "with joy", "in the rain"]
_EXTRA = ["good", "great", "bad", "sad", "happy", "awful", "nice", "love", "hate", "one", "two", "three",
          "four", "five", "plus", "minus", "equals", "yes", "no"]


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Return `n` simple English-like sentences drawn from a fixed grammar (deterministic in `seed`)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ADVERBS)]
        words += rng.sample(_EXTRA, k=rng.randint(0, 3))
        out.append(" ".join(words) + ".")
    return out


POSITIVE_WORDS = ("good", "great", "happy", "nice", "love")
NEGATIVE_WORDS = ("bad", "sad", "awful", "hate")
MAX_SENTIMENT_WORDS = 3

_WORD = re.compile(r"[a-z]+")


def gold_reward(completion: str) -> float:
    """#positive words − #negative words in `completion` (whole words, case-insensitive)."""
    words = _WORD.findall(completion.lower())
    return float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words))


def gold_rewards(completions: list[str]) -> list[float]:
    """`gold_reward` of each completion."""
    return [gold_reward(c) for c in completions]


def _prompt(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"


def _completion(rng: random.Random) -> str:
    k = rng.randint(1, MAX_SENTIMENT_WORDS)
    words = [rng.choice(POSITIVE_WORDS if rng.random() < 0.5 else NEGATIVE_WORDS) for _ in range(k)]
    return f" {rng.choice(_ADVERBS)} {' '.join(words)}."


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts (sentence starts), deterministic in `seed`."""
    rng = random.Random(seed)
    return [_prompt(rng) for _ in range(n)]


def sft_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` SFT records `{"prompt", "completion"}`; completions carry 1–3 sentiment words, each positive
    or negative with probability 1/2."""
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "completion": _completion(rng)} for _ in range(n)]


def preference_records(n: int, seed: int = 0, min_gap: float = 1.0) -> list[dict[str, str | float]]:
    """`n` preference records `{"prompt", "chosen", "rejected", "margin"}`: two completions of one prompt
    whose gold rewards differ by at least `min_gap`, the higher one chosen; `margin` is the gold gap."""
    if min_gap <= 0 or min_gap > 2 * MAX_SENTIMENT_WORDS:
        raise ValueError(f"min_gap ({min_gap}) must be in (0, {2 * MAX_SENTIMENT_WORDS}]")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        prompt, a, b = _prompt(rng), _completion(rng), _completion(rng)
        ga, gb = gold_reward(a), gold_reward(b)
        if abs(ga - gb) < min_gap:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": abs(ga - gb)})
    return out
