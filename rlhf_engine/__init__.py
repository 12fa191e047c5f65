"""rlhf_engine: an asynchronous RLHF engine (SFT, reward modelling, PPO, DPO) with fused kernels."""

__version__ = "0.1.0"
