"""PPO: `PPOTrainer` (`trainer`), its config (`config`), the experience of one step (`experience`), reward
shaping and the KL controller, the update (`update`) and its statistics (`stats`)."""
