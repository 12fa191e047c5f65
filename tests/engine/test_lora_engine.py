"""An engine run with a LoRA policy (transformers generators, merged weights): it trains, checkpoints PEFT
folders, and a resumed run ends with the same adapters as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from _runs import run_config
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import latest_checkpoint
from rlhf_engine.engine.core import RLHFEngine
from rlhf_engine.models.lora import LoraConfig

pytest.importorskip("peft")


def lora_run(tmp_path, policy_dir, prompts_file, **engine):
    config = run_config(tmp_path, policy_dir, prompts_file, backend="transformers", mode="sync", total_steps=2,
                        **engine)
    config.model.lora = LoraConfig(r=8, sync="merged")
    return config


def test_lora_engine_resume_gives_the_same_adapters(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    with RLHFEngine(lora_run(tmp_path / "a", policy_dir, prompts_file, save_steps=1)) as engine:
        history = engine.train()
        assert engine.trainer.lora and engine.trainer.policy_version == 2
    assert [h["ppo/optimizer_steps"] for h in history] == [2.0, 2.0]  # 8 samples in minibatches of 4
    # its step-1 checkpoint continued by another run
    resumed = lora_run(tmp_path / "b", policy_dir, prompts_file, save_steps=1)
    with RLHFEngine(resumed, resume=tmp_path / "a" / "run" / "checkpoints" / "step-00000001") as engine:
        assert engine.step == 1 and engine.trainer.policy_version == 1
        engine.train()
    assert_no_new_children()
    a, b = latest_checkpoint(tmp_path / "a" / "run"), latest_checkpoint(tmp_path / "b" / "run")
    assert a.name == b.name == "step-00000002"
    assert not (a / "policy" / "model.safetensors").exists()
    for name in ("policy/adapter_model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs after resume"
