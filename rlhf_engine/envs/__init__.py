"""Environments: what a rollout is an episode of (multi-turn dialogue, tools, games).

- `protocol.py`: the `Environment` protocol (`reset` / `step` / `close`), `StepResult`, and
  `EnvironmentConfig` (`generator.environment`: an import path and the episode's bounds).
- `single_turn.py`: `SingleTurn`, the environment of a run without one.
- `template.py`: `ChatTemplate`, observations as the chat template's token delta.
- `sandbox.py`: `Sandbox`, tool code in a child process under limits the config sets.
- Built-in examples: `arithmetic.py` (a calculator tool), `guess_number.py` (a game rewarded at the end).

The generator plays the episodes (`rlhf_engine.rollout.episodes`); the trainer trains on their sampled tokens.
"""

from rlhf_engine.envs.protocol import Environment, EnvironmentConfig, Message, StepResult

__all__ = ["Environment", "EnvironmentConfig", "Message", "StepResult"]
