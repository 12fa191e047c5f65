"""Helpers of the engine tests: a small run config, and rogue peers (run as scripts)."""

from __future__ import annotations

from pathlib import Path

from rlhf_engine.engine.config import load_run_config


def run_config(tmp_path: Path, policy_dir: Path, prompts_file: Path, *, backend: str, transport: dict | None = None,
               generator: dict | None = None, ppo: dict | None = None, data: dict | None = None, **engine):
    return load_run_config(None, base={
        "model": {"policy": str(policy_dir), "reward_fn": "rlhf_engine.demo:gold_scores",
                  "gold_fn": "rlhf_engine.demo:gold_scores"},
        "data": {"prompts": str(prompts_file), "max_prompt_length": 16, **(data or {})},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
                "response_length": 8, "seed": 0, **(ppo or {})},
        "generator": {"backend": backend, "max_model_len": 64, "kv_cache_bytes": 1 << 26, **(generator or {})},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep", "heartbeat_timeout_s": 20.0, **(transport or {})},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl"], "progress": False, **engine},
    })
