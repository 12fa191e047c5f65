"""PPO with a LoRA policy: the reference is the base with adapters disabled (no copy), only adapters and the
value head train, weights for the generators are merged, checkpoints are PEFT folders that resume exactly."""

import copy
from dataclasses import replace

import pytest
import torch

from rlhf_engine.models.loading import AdaptersDisabled
from rlhf_engine.models.lora import LoraConfig, apply_lora
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.passes.layout import PassLayout
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

peft = pytest.importorskip("peft")

B = 8


def lora_trainer(lm, tokenizer, lora=LoraConfig(), **overrides):
    kwargs = dict(batch_size=B, mini_batch_size=B, ppo_epochs=1, learning_rate=1e-2, response_length=6)
    kwargs.update(overrides)
    model = AutoModelForCausalLMWithValueHead(apply_lora(lm, lora))
    return PPOTrainer(config=PPOConfig(**kwargs), model=model, tokenizer=tokenizer)


@pytest.fixture
def data(tokenizer, random_pairs):
    queries, responses = random_pairs(B, seed=7, eos=tokenizer.eos_token_id)
    return queries, responses, torch.linspace(-1.0, 1.0, B)


def _storages(*modules):
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def test_reference_is_the_base_with_adapters_disabled_and_no_copy(make_lm, tokenizer, data):
    trainer = lora_trainer(make_lm(seed=0), tokenizer, ppo_epochs=2)
    base = make_lm(seed=0).eval()  # the same initial weights, loaded separately
    assert isinstance(trainer.ref_model, AdaptersDisabled)
    # no frozen copy: the reference holds no tensor the policy does not, and the trainer's models hold one
    # copy of the base weights
    assert _storages(trainer.ref_model) <= _storages(trainer.model)
    n_base = sum(p.numel() for p in base.parameters())
    n_held = sum(p.numel() for p in {id(p): p for m in (trainer.model, trainer.ref_model)
                                     for p in m.parameters()}.values())
    n_adapters = 1 * 4 * 2 * 16 * 128  # 1 layer x {q, k, v, o} x (A [16, 128] + B [128, 16])
    assert n_held == n_base + n_adapters + 128 + 1  # + the value head
    for _ in range(2):
        stats = trainer.step(*data)
    assert abs(stats["objective/kl"]) > 1e-4  # the adapters moved the policy from its base (k1: any sign)
    batch = make_token_batch(*data[:2], tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        ref = forward_policy(trainer.ref_model, batch, 1.0).logp
        separate = forward_policy(base, batch, 1.0).logp
        policy = forward_policy(trainer.model, batch, 1.0).logp
    torch.testing.assert_close(ref, separate, rtol=0, atol=1e-6)
    assert (policy - ref).abs().max() > 1e-3


def test_only_adapters_and_value_head_train(make_lm, tokenizer, data):
    trainer = lora_trainer(make_lm(seed=0), tokenizer)
    # peft models and the reference view run packed, sharing queries
    assert replace(trainer.layout, attention_width=0) == PassLayout(policy=True, ref=True)
    assert trainer.layout.attention_width > 0  # and share queries
    in_optimizer = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in in_optimizer) == 1 * 4 * 2 * 16 * 128 + 128 + 1
    frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.step(*data)
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert trainer.policy_version == 1


def test_policy_weights_are_merged_and_adapters_separate(make_lm, tokenizer, data):
    trainer = lora_trainer(make_lm(seed=0), tokenizer)
    trainer.step(*data)
    weights = trainer.policy_state_dict()
    merged = copy.deepcopy(trainer.model.pretrained_model).merge_and_unload().state_dict()
    assert list(weights) == list(make_lm(seed=0).state_dict())
    for name, tensor in merged.items():
        assert torch.equal(weights[name], tensor), name
    assert dict(trainer.policy_weights()).keys() == weights.keys()
    adapters = trainer.adapter_state_dict()
    assert list(dict(trainer.policy_weights(adapters=True))) == list(adapters)
    assert len(adapters) == 8 and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in adapters)
    assert trainer.adapter_config()["r"] == 16 and trainer.adapter_config()["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    full = PPOTrainer(config=PPOConfig(batch_size=B, mini_batch_size=B), tokenizer=tokenizer,
                      model=AutoModelForCausalLMWithValueHead(make_lm(seed=0)))
    with pytest.raises(RuntimeError, match=r"policy_weights\(adapters=True\): the policy has no LoRA adapters"):
        full.adapter_state_dict()
    with pytest.raises(RuntimeError, match="adapter_config: the policy has no LoRA adapters"):
        full.adapter_config()


def test_lora_rejects_several_ranks(tmp_path):
    from rlhf_engine.engine.config import load_run_config
    from rlhf_engine.engine.ranks.run import preflight

    config = load_run_config(None, base={
        "model": {"policy": str(tmp_path), "reward_fn": "m:f", "lora": {"r": 8}},
        "data": {"prompts": "p.jsonl"}, "ppo": {"batch_size": 8, "mini_batch_size": 4}})
    preflight(config, 1)
    with pytest.raises(ValueError, match=r"model.lora: LoRA policies train on one trainer rank, not 2"):
        preflight(config, 2)
