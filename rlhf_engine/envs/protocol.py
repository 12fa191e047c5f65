"""What an environment is: the `Environment` protocol, its `StepResult`, and `EnvironmentConfig`, which names
one by import path and bounds its episodes.

An episode, as the generator runs it (`rlhf_engine.rollout.episodes`):

    messages = env.reset(record)          # the conversation's start (None: the dataset prompt as given)
    loop:  the policy samples a turn  ->  result = env.step({"role": "assistant", "content": text})
           result.observations are appended (as the chat template's delta) unless result.done
    env.close()

`reset`, `step` and `close` may be plain methods or coroutines (`async def`): the runner awaits what they
return (on one event loop for the generator). Each episode gets its own instance (`EnvironmentConfig.build`),
so an environment keeps its episode's state in `self`. A method that raises (anything, `SystemExit` included),
returns what cannot be used or overruns `step_timeout_s` ends its episode (`EpisodeInfo.truncated` says why),
never the run. The generator builds and closes one instance at start: a class or kwargs that do not fit stop it
there, in one line.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]
"""A chat message: `{"role": ..., "content": ...}`."""


@dataclass(frozen=True)
class StepResult:
    """What `Environment.step` returns (a 4-tuple `(observations, reward, done, info)` is taken too)."""

    observations: list[Message] = field(default_factory=list)
    """Messages answering the model's turn (a tool's output, a user's reply); ignored when `done`."""
    reward: float | None = None
    """This step's reward; the episode's reward is the sum over its steps (None when no step gave one)."""
    done: bool = False
    """The episode is over."""
    info: dict[str, Any] = field(default_factory=dict)
    """Numbers about the step: `tool_calls`, `tool_errors`, `tool_timeouts` are summed over the episode
    (`EpisodeInfo`); the other numeric entries of the last step become `EpisodeInfo.metrics`."""

    @classmethod
    def of(cls, value: Any) -> "StepResult":
        """`value` (a `StepResult` or a 4-tuple) checked: `ValueError` saying what is wrong."""
        if isinstance(value, tuple) and len(value) == 4:
            value = cls(*value)
        if not isinstance(value, StepResult):
            raise ValueError(f"step must return a StepResult or (observations, reward, done, info), got "
                             f"{type(value).__name__}")
        check_messages(value.observations, "step observations")
        if value.reward is not None and (isinstance(value.reward, bool) or not isinstance(value.reward, (int, float))
                                         or not math.isfinite(value.reward)):
            raise ValueError(f"step reward must be a finite number or None, got {value.reward!r}")
        if not isinstance(value.done, bool):
            raise ValueError(f"step done must be a bool, got {type(value.done).__name__}")
        if not isinstance(value.info, dict):
            raise ValueError(f"step info must be a dict, got {type(value.info).__name__}")
        return value


def check_messages(messages: Any, what: str) -> list[Message]:
    """`messages` if it is a list of `{"role": str, "content": str}` dicts; else `ValueError` naming `what`."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{what} must be a list of {{'role': str, 'content': str}} messages, got {messages!r:.120}")
    return messages


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (plain or `async def` methods)."""

    def reset(self, record: dict[str, Any]) -> list[Message] | None:
        """Start an episode for the dataset `record` (its `prompt` and other fields); return the opening
        messages, rendered with the chat template and its generation prompt, or None for the dataset's prompt
        as the trainer tokenized it."""
        ...

    def step(self, message: Message) -> StepResult:
        """Answer the model's turn (`{"role": "assistant", "content": the decoded turn}`)."""
        ...

    def close(self) -> None:
        """Release what the episode holds (tools, processes); called once, whatever happened."""
        ...


@dataclass
class EnvironmentConfig:
    """The environment every episode of a run plays (`generator.environment`)."""

    name: str = "rlhf_engine.envs.single_turn:SingleTurn"
    """Import path `package.module:Class` of the environment; the default is one turn per episode (every
    run without an environment)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the class (JSON values), the same for every episode."""
    max_turns: int = 4
    """Most model turns per episode; an episode still running after them ends `max_turns`."""
    max_turn_tokens: int = 0
    """Most tokens the model samples in one turn; 0: the whole trajectory budget (`ppo.response_length`,
    which counts every token after the prompt, the environment's included)."""
    step_timeout_s: float = 30.0
    """Longest `reset` or `step` call, counted from when a thread starts it (a call waiting for a thread waits
    for one); past it the episode ends `step_timeout`, and the call's thread is left to finish and replaced.
    A tool's own limits are `rlhf_engine.envs.sandbox.SandboxLimits`."""
    concurrency: int = 16
    """Environment calls running at once in a generator (threads); episodes waiting on a slow step never hold
    up the others' turns."""
    lockstep: bool = False
    """Play a batch's turns in lockstep: every running episode's step returns (or times out) before the next
    `generate` call. Which episodes share a call then depends on nothing but the episodes, so a run with a
    deterministic environment reproduces bit for bit (a resumed one too); a slow step holds up its whole batch.
    False: episodes interleave (a turn's call takes the episodes whose steps have returned)."""

    def __post_init__(self) -> None:
        if ":" not in self.name or not all(self.name.split(":", 1)):
            raise ValueError(f"environment.name ({self.name!r}) must look like 'package.module:Class'")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"environment.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        if self.max_turns < 1:
            raise ValueError(f"environment.max_turns ({self.max_turns}) must be >= 1")
        if self.max_turn_tokens < 0:
            raise ValueError(f"environment.max_turn_tokens ({self.max_turn_tokens}) must be >= 0 (0: the budget)")
        if not (isinstance(self.step_timeout_s, (int, float)) and math.isfinite(self.step_timeout_s)
                and self.step_timeout_s > 0):
            raise ValueError(f"environment.step_timeout_s ({self.step_timeout_s}) must be a finite number > 0")
        if self.concurrency < 1:
            raise ValueError(f"environment.concurrency ({self.concurrency}) must be >= 1")

    @property
    def single_turn(self) -> bool:
        """The default environment: prompts as the trainer tokenized them, one turn each."""
        return self.name == EnvironmentConfig.name

    def resolve(self) -> type:
        """The class `name` names; `ValueError` in one line when it does not resolve."""
        module_name, _, attr = self.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"environment.name ({self.name!r}) does not resolve: {e}") from None
        if not callable(cls):
            raise ValueError(f"environment.name ({self.name!r}) is not a class or factory")
        return cls

    def build(self) -> Environment:
        """A new environment for one episode."""
        return self.resolve()(**self.kwargs)
