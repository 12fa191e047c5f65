"""`GuessNumber`: a multi-turn game rewarded only at its end (a built-in example environment).

The environment picks the record's `target` (an int in [low, high]); the model guesses (the first integer in its
turn), hears `higher` or `lower`, and guesses again, up to `max_guesses` times. The episode ends at the right
guess (reward 1) or after the last guess (reward 0.5 x closeness of that guess, 1 - |guess - target| / (high -
low); 0 without a number), so every step but the last has no reward.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_engine.envs.protocol import Message, StepResult

_INTEGER = re.compile(r"-?\d+")


class GuessNumber:
    """Guess the record's `target` in [low, high] with higher/lower feedback (see the module docstring)."""

    def __init__(self, low: int = 0, high: int = 9, max_guesses: int = 3) -> None:
        if not low < high:
            raise ValueError(f"GuessNumber: low ({low}) must be < high ({high})")
        if max_guesses < 1:
            raise ValueError(f"GuessNumber: max_guesses ({max_guesses}) must be >= 1")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.target: int | None = None
        self.guesses = 0

    def reset(self, record: dict[str, Any]) -> list[Message]:
        target = record.get("target")
        if isinstance(target, bool) or not isinstance(target, int) or not self.low <= target <= self.high:
            raise ValueError(f"GuessNumber: record field 'target' must be an int in [{self.low}, {self.high}], "
                             f"got {target!r}")
        self.target, self.guesses = target, 0
        return [{"role": "user", "content": f"I picked a number from {self.low} to {self.high}. Guess it: say one "
                                            f"number; I will answer higher or lower. You have {self.max_guesses} "
                                            "guesses."}]

    def step(self, message: Message) -> StepResult:
        self.guesses += 1
        found = _INTEGER.search(message["content"])
        guess = int(found.group()) if found else None
        last = self.guesses >= self.max_guesses
        info = {"guesses": self.guesses, "solved": float(guess == self.target)}
        if guess == self.target:
            return StepResult(reward=1.0, done=True, info=info)
        if last:
            closeness = 0.0 if guess is None else max(0.0, 1 - abs(guess - self.target) / (self.high - self.low))
            return StepResult(reward=0.5 * closeness, done=True, info=info)
        hint = ("Say one number." if guess is None else "higher" if guess < self.target else "lower")
        return StepResult(observations=[{"role": "user", "content": hint}], info=info)

    def close(self) -> None:
        pass
