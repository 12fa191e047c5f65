"""Trainers: PPO (`ppo.py`, `PPOConfig` in `ppo_config.py`) with its RL math in small modules, SFT, reward, DPO.

Import from the submodules; this package imports nothing heavy on its own.
"""
