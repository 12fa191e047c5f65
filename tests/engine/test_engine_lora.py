"""The async engine with a LoRA policy and adapter-only weight sync (`model.lora.sync: adapters`):
every rollout is sampled by exactly the trainer's adapters of the version it carries."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from _runs import run_config

from rlhf_engine.engine.core import Callback, RLHFEngine
from tests.helpers.rollout import peft_reference, reference_logprobs

pytest.importorskip("peft")


class AdapterVersions(Callback):
    """The trainer's adapters at each policy version (copied at the start and after every step) and
    every rollout the trainer trained on."""

    def __init__(self) -> None:
        self.engine: RLHFEngine | None = None
        self.adapters: dict[int, dict] = {}
        self.rollouts = []

    def record(self) -> None:
        trainer = self.engine.trainer
        self.adapters[trainer.policy_version] = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}

    def on_step(self, step, stats) -> None:
        self.record()

    def on_rollout(self, rollout) -> None:
        self.rollouts.append(rollout)


# vllm: ~80 s on a loaded 2-core machine (the adapter sync into vLLM is also in tests/rollout/test_vllm_lora.py)
@pytest.mark.parametrize("backend", ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_async_lora_run_samples_with_the_synced_adapters(tmp_path, policy_dir, prompts_file, backend,
                                                          assert_no_new_children):
    if backend == "vllm":
        pytest.importorskip("vllm")
    from rlhf_engine.models.lora import LoraConfig

    cfg = run_config(tmp_path, policy_dir, prompts_file, backend=backend, total_steps=3, mode="async", max_staleness=1)
    lora = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")
    # a large step size moves the adapters far enough after one step for the check below to tell versions apart
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora),
                              ppo=dataclasses.replace(cfg.ppo, learning_rate=5e-2))
    rec = AdapterVersions()
    with RLHFEngine(cfg, callbacks=[rec]) as engine:
        rec.engine = engine
        rec.record()  # version 0: peft's initial adapters (B = 0), the base
        history = engine.train()
    assert_no_new_children()
    assert len(history) == 3 and all(h["off_policy/staleness_max"] <= 1 for h in history)

    versions = sorted({r.policy_version for r in rec.rollouts})
    assert versions[-1] >= 1, "no rollout was sampled after an adapter update"
    base = peft_reference(policy_dir, lora, rec.adapters[0])
    for version in versions:
        model = peft_reference(policy_dir, lora, rec.adapters[version])
        rollouts = [r for r in rec.rollouts if r.policy_version == version]
        for r in rollouts:
            c = SimpleNamespace(prompt_ids=r.prompt_ids, response_ids=r.response_ids)
            # the generator's log-probs are those of the trainer's adapters of this version
            assert (reference_logprobs(model, c) - r.behaviour_logp).abs().max().item() <= 1e-4, (backend, version)
        if version > 0:  # and those adapters are not the base: the check above tells the versions apart
            c = SimpleNamespace(prompt_ids=rollouts[0].prompt_ids, response_ids=rollouts[0].response_ids)
            assert (reference_logprobs(base, c) - rollouts[0].behaviour_logp).abs().max().item() > 1e-3
