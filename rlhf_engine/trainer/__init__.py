"""Trainers: PPO (`ppo/`) and the offline stages (`stages/`: SFT, reward model, DPO), the passes that lay a
batch out (`passes/`), the shared RL math (`advantages`, `losses`), optimizer, schedule and HF export.

Import from the submodules; this package imports nothing heavy on its own.
"""
