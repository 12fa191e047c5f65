"""Helpers shared by the tests, imported as `tests.helpers.<module>` (the repository root is on
`sys.path`: pytest's `pythonpath` setting).

- `peers`: transport endpoints, fast configs and spawned peer processes;
- `processes`: generator / stand-in trainer processes for the rollout process tests (`python -m`);
- `rollout`: reference log-probs, perturbed weights, prompts and stop strings for generator tests;
- `steps`: one PPO step's stats and weights, and the check that two ways of computing it agree;
- `tolerances`: per-dtype tolerances of the kernels against their references;
- `waiting`: `wait_until`, the deadline poll every test waits with (never a fixed sleep).
"""
