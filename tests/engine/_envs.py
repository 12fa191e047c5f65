"""Environments of the engine tests, importable by the generator processes (they start in the repository root)."""

from __future__ import annotations

import time

from rlhf_engine.envs.guess_number import GuessNumber


class SlowGuess(GuessNumber):
    """`GuessNumber` whose every step takes `delay_s`: an episode lasts long enough for a kill to land inside."""

    def __init__(self, delay_s: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def step(self, message):
        time.sleep(self.delay_s)
        return super().step(message)
