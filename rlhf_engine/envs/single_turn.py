"""`SingleTurn`: the environment of a run without one: the dataset's prompt, one model turn, done."""

from __future__ import annotations

from typing import Any

from rlhf_engine.envs.protocol import Message, StepResult


class SingleTurn:
    """One turn on the prompt as the trainer tokenized it; the trainer's reward scores it."""

    def reset(self, record: dict[str, Any]) -> None:
        return None

    def step(self, message: Message) -> StepResult:
        return StepResult(done=True)

    def close(self) -> None:
        pass
