"""LoRA checkpoints of a PPO run: the policy is a PEFT folder (loadable with `PeftModel.from_pretrained`),
dcp/ holds the trained parameters alone (not the frozen base), resuming restores the same adapters, value head
and optimizer, and the run continues exactly."""

import json

import pytest
import torch

from rlhf_engine.common.checkpoint import checkpoint_path
from rlhf_engine.distributed import Comm
from rlhf_engine.engine.build_trainer import build_ppo_trainer
from rlhf_engine.engine.config import load_run_config
from rlhf_engine.models.loading import AdaptersDisabled
from rlhf_engine.models.tiny import TinyLlamaSpec, make_tiny_model_dir
from rlhf_engine.trainer.ppo.checkpoint import load_trainer, save_trainer
from tests.distributed.conftest import read_dcp_tensors
from tests.trainer.conftest import make_random_pairs

peft = pytest.importorskip("peft")

B = 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpt")
    spec = TinyLlamaSpec(num_layers=1)
    return make_tiny_model_dir(root / "policy", spec, seed=0), make_tiny_model_dir(root / "critic", spec, seed=1)


def run_config(model_dirs, tmp_path, **model):
    policy, critic = model_dirs
    return load_run_config(None, base={
        "model": {"policy": str(policy), "reward_fn": "rlhf_engine.demo:gold_scores", "lora": {"r": 8}, **model},
        "data": {"prompts": "p.jsonl"},
        "ppo": {"batch_size": B, "mini_batch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-2, "response_length": 6},
        "engine": {"run_dir": str(tmp_path / "run")},
    })


def batches(tokenizer, n):
    out = []
    for k in range(n):
        queries, responses = make_random_pairs(B, seed=10 + k, eos=tokenizer.eos_token_id)
        out.append((queries, responses, torch.linspace(-1.0, 1.0, B).roll(k)))
    return out


def trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_restores_the_adapters_and_continues_exactly(model_dirs, tmp_path):
    config = run_config(model_dirs, tmp_path)
    trainer, tokenizer = build_ppo_trainer(config, None, Comm())
    assert isinstance(trainer.ref_model, AdaptersDisabled)
    steps = batches(tokenizer, 3)
    for queries, responses, scores in steps[:2]:
        trainer.step(queries, responses, scores)
    ckpt = save_trainer(Comm(), checkpoint_path(config.engine.run_dir, 2), trainer, {})
    saved_params = [key for key in read_dcp_tensors(ckpt / "dcp") if key.startswith("model.")]
    assert saved_params and all(".lora_" in key or ".v_head." in key for key in saved_params)  # not the base
    policy_dir = ckpt / "policy"
    names = {p.name for p in policy_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "value_head.safetensors" not in names
    assert (ckpt / "value_head.safetensors").is_file()  # beside the adapters: policy/ holds the LM's alone
    assert not (policy_dir / "model.safetensors").exists()  # adapters only, not the base
    saved = json.loads((policy_dir / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == (
        8, 32.0, str(model_dirs[0].resolve()))

    # the folder is a PEFT folder: peft puts the trained adapters back on the base
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs[0]), str(policy_dir))
    ids = torch.tensor([[5, 9, 17, 33, 64]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model.pretrained_model(ids).logits, rtol=0, atol=1e-6)

    resumed, _ = build_ppo_trainer(config, ckpt, Comm())
    load_trainer(ckpt, resumed)
    assert resumed.policy_version == trainer.policy_version == 2
    live, back = trained_state(trainer.model), trained_state(resumed.model)
    assert list(back) == list(live)
    for name in live:
        assert torch.equal(back[name], live[name]), name
    # the run continues: one more step on each gives the same adapters and value head
    stats_a = trainer.step(*steps[2])
    stats_b = resumed.step(*steps[2])
    assert stats_a["ppo/loss/total"] == stats_b["ppo/loss/total"]
    live, back = trained_state(trainer.model), trained_state(resumed.model)
    for name in live:
        assert torch.equal(back[name], live[name]), name


def test_fresh_adapters_are_drawn_from_the_run_seed(model_dirs, tmp_path):
    config = run_config(model_dirs, tmp_path)
    torch.manual_seed(1)
    first = trained_state(build_ppo_trainer(config, None, Comm())[0].model)
    torch.manual_seed(2)  # another global RNG state: the same adapters
    second = trained_state(build_ppo_trainer(config, None, Comm())[0].model)
    a = "pretrained_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert first[a].abs().sum() > 0 and all(torch.equal(first[n], second[n]) for n in first)


def test_resume_errors_name_the_mismatch(model_dirs, tmp_path):
    config = run_config(model_dirs, tmp_path)
    trainer, _ = build_ppo_trainer(config, None, Comm())
    ckpt = save_trainer(Comm(), checkpoint_path(config.engine.run_dir, 1), trainer, {})
    with pytest.raises(ValueError, match=r"the saved adapters have r=8, alpha=32.0; model.lora has r=4, alpha=32.0"):
        build_ppo_trainer(run_config(model_dirs, tmp_path, lora={"r": 4}), ckpt, Comm())
    with pytest.raises(ValueError, match="holds LoRA adapters but model.lora is not set"):
        build_ppo_trainer(run_config(model_dirs, tmp_path, lora=None), ckpt, Comm())


def test_lora_critic_trains_adapters_and_saves_a_peft_folder(model_dirs, tmp_path):
    config = run_config(model_dirs, tmp_path, value_model=str(model_dirs[1]), lora={"r": 8, "critic": True})
    trainer, tokenizer = build_ppo_trainer(config, None, Comm())
    critic = trainer.value_model
    assert trainer.layout.critic  # the LoRA critic runs packed too
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("v_head.")}
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= trainable and len(trainable) == 2 + 8
    head = critic.v_head.summary.weight.clone()
    trainer.step(*batches(tokenizer, 1)[0])
    assert not torch.equal(critic.v_head.summary.weight, head)
    trainer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "critic" / "adapter_config.json").is_file()
