"""The offline stages: the shared loop and config (`base`), SFT, reward-model training and DPO."""
