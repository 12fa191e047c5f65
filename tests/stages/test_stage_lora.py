"""SFT, reward and DPO stages with LoRA adapters: only the adapters (and a reward model's score head) train,
the saved folder is the merged model (loads like a full-weight one) with the adapters in `adapter/`."""

import pytest
import torch

from rlhf_engine.common.config_io import from_dict
from rlhf_engine.data import preference_batch, synthetic
from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.trainer.stages.dpo import DPOTrainer
from rlhf_engine.trainer.stages.dpo_config import DPOConfig
from rlhf_engine.trainer.stages.reward import RewardTrainer
from rlhf_engine.trainer.stages.reward_config import RewardConfig
from rlhf_engine.trainer.stages.sft import SFTTrainer
from rlhf_engine.trainer.stages.sft_config import SFTConfig

peft = pytest.importorskip("peft")


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_yaml_takes_a_lora_section(tiny_dir):
    config = from_dict(SFTConfig, {"model_name_or_path": str(tiny_dir), "lora": {"r": 4, "alpha": 8}})
    assert config.lora == LoraConfig(r=4, alpha=8.0)
    assert from_dict(DPOConfig, {"lora": {"target_modules": ["q_proj"]}}).lora.target_modules == ["q_proj"]


def test_sft_with_lora_trains_adapters_and_saves_merged_plus_adapters(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = SFTConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path / "out"), learning_rate=1e-2,
                       per_device_train_batch_size=16, max_steps=12, logging_steps=4, max_length=64,
                       lora=LoraConfig(r=8, target_modules="all-linear"))
    trainer = SFTTrainer(config, train_dataset=synthetic.sft_records(200))
    names = trainable(trainer.model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    metrics = trainer.train()
    assert metrics["train/loss"] < metrics["train/first_loss"] - 0.5
    out = tmp_path / "out"
    ids = torch.tensor([[5, 9, 17, 33, 64, 100]])
    trainer.model.eval()
    with torch.no_grad():
        live = trainer.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        adapters = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out / "adapter"))
        torch.testing.assert_close(merged, live, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapters(input_ids=ids).logits, live, rtol=0, atol=1e-6)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=ids).logits
    assert (base - live).abs().max() > 1e-2  # it trained


def test_reward_with_lora_trains_the_score_head_and_saves_a_scorer(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = RewardConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path / "rm"), learning_rate=1e-2,
                          per_device_train_batch_size=16, max_steps=10, logging_steps=5, max_length=64,
                          lora=LoraConfig(r=8))
    trainer = RewardTrainer(config, train_dataset=synthetic.preference_records(160, min_gap=2))
    names = trainable(trainer.model)
    assert {n for n in names if ".lora_" not in n} == {"base_model.model.score.modules_to_save.default.weight"}
    trainer.train()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    batch = preference_batch(trainer.train_data[:4], trainer.tokenizer.pad_token_id)
    trainer.model.eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = trainer.rewards(batch)
    torch.testing.assert_close(got, torch.cat([chosen, rejected]), rtol=0, atol=1e-5)


def test_dpo_with_lora_uses_the_base_as_reference_and_raises_the_margin(tiny_dir, tmp_path):
    config = DPOConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path), learning_rate=1e-2,
                       per_device_train_batch_size=16, max_steps=12, logging_steps=4, eval_split=0.25,
                       max_length=64, beta=0.1, lora=LoraConfig(r=8))
    trainer = DPOTrainer(config, train_dataset=synthetic.preference_records(128, min_gap=2))
    before = trainer.evaluate()
    assert before["eval/rewards/margins"] == 0.0  # the reference is the base: B = 0 at the start
    assert [n for n, v in vars(trainer).items() if isinstance(v, torch.nn.Module)] == ["model"]
    metrics = trainer.train()
    assert metrics["eval/rewards/margins"] > 0.05
    assert metrics["train/loss"] < metrics["train/first_loss"]
