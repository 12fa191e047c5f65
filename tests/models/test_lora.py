"""LoRA adapters (`rlhf_engine.models.lora`): config checks, what is frozen, names and values against peft's
own save and merge, the base with adapters disabled, the merged export."""

import copy
import json
import sys

import pytest
import torch

from rlhf_engine.common.config_io import ConfigError
from rlhf_engine.models.lora import (
    LoraConfig,
    adapter_config_dict,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    merged_state_dict,
    model_adapter_config,
)

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 9, 17, 33, 64, 100, 7, 250]])


def randomize_adapters(model, seed=1):
    """lora_B starts at zero (the adapted model equals its base): give every adapter tensor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"model.lora.r \(0\) must be an integer >= 1"),
    (dict(alpha=0.0), r"model.lora.alpha \(0.0\) must be > 0"),
    (dict(dropout=1.0), r"model.lora.dropout \(1.0\) must be in \[0, 1\)"),
    (dict(target_modules=[]), r"model.lora.target_modules \(\[\]\) must be a non-empty list"),
    (dict(target_modules="attention"), r"model.lora.target_modules \('attention'\) must be a list"),
    (dict(sync="full"), r"model.lora.sync \('full'\) must be 'adapters' or 'merged'"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_run_config_yaml_names_the_real_lora_field(tmp_path, base_dir):
    from rlhf_engine.engine.config import load_run_config

    path = tmp_path / "run.yaml"
    head = f"model:\n  policy: {base_dir}\n  reward_fn: m:f\n  lora:\n"
    path.write_text(head + "    r: 8\n    target_modules: all-linear\ndata:\n  prompts: p.jsonl\n")
    lora = load_run_config(path).model.lora
    assert (lora.r, lora.alpha, lora.target_modules, lora.sync) == (8, 32.0, "all-linear", "adapters")
    path.write_text(head + "    r: many\ndata:\n  prompts: p.jsonl\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5: model.lora.r = 'many' must be an integer$"):
        load_run_config(path)
    path.write_text(head + "    rank: 8\ndata:\n  prompts: p.jsonl\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5: unknown key\(s\) 'model.lora.rank'"):
        load_run_config(path)
    path.write_text(head + "    r: 0\ndata:\n  prompts: p.jsonl\n")
    with pytest.raises(ConfigError, match=r"model.lora.r \(0\) must be an integer >= 1"):
        load_run_config(path)
    path.write_text(head + "    critic: true\ndata:\n  prompts: p.jsonl\n")
    with pytest.raises(ConfigError, match="model.lora.critic is true but model.value_model is not set"):
        load_run_config(path)


def test_apply_lora_trains_only_the_adapters(load_base):
    model = apply_lora(load_base(), LoraConfig(r=16))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # 2 layers x {q, k, v, o} (each 128 x 128), A [16, 128] + B [128, 16] each: 2 * 4 * 2 * 16 * 128 = 32768
    assert sum(trainable.values()) == 32768
    assert len(trainable) == 16 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == sum(
        p.numel() for p in load_base().parameters())


def test_target_modules_matching_nothing_names_the_setting_and_the_layers(load_base):
    model = load_base()
    with pytest.raises(ValueError) as e:
        apply_lora(model, LoraConfig(target_modules=["query", "value"]))
    text = str(e.value)
    assert "model.lora.target_modules (['query', 'value']) matches no linear layer of LlamaForCausalLM" in text
    assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in text
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # the model was not changed


def test_rank_larger_than_a_layer_names_the_setting(load_base):
    with pytest.raises(ValueError, match=r"model.lora.r \(129\) exceeds the rank of model.layers.0.self_attn.q_proj "
                                         r"\(128 x 128\): choose r <= 128"):
        apply_lora(load_base(), LoraConfig(r=129))
    # all-linear reaches the MLP too (256 x 128): r 128 still fits every layer
    model = apply_lora(load_base(), LoraConfig(r=128, target_modules="all-linear"))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "base_model.model.model.layers.1.mlp.down_proj" in adapted and len(adapted) == 2 * 7  # not lm_head


def test_missing_peft_is_one_line_naming_the_extra(load_base, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError) as e:
        apply_lora(load_base(), LoraConfig())
    assert str(e.value) == "LoRA needs the peft package: pip install 'rlhf-engine[lora]'"


def test_merged_state_dict_equals_peft_merge_and_unload_and_leaves_the_model(load_base):
    model = randomize_adapters(apply_lora(load_base(), LoraConfig(r=4, alpha=8.0, target_modules="all-linear")))
    with torch.no_grad():
        before = model(IDS).logits
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert list(merged) == list(reference) == list(load_base().state_dict())
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.merged
    # W + (alpha / r) * B @ A by hand for one layer
    expected = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_adapter_names_and_config_are_what_peft_saves(load_base, base_dir, tmp_path):
    from safetensors.torch import load_file

    config = LoraConfig(r=8, alpha=16.0)
    model = randomize_adapters(apply_lora(load_base(), config))
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ours = adapter_state_dict(model)
    assert sorted(ours) == sorted(saved)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    for name, tensor in saved.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    written["target_modules"] = sorted(written["target_modules"])  # peft writes a set in hash order
    assert adapter_config_dict(config, str(base_dir)) == written == model_adapter_config(model)
    # the folder is a PEFT folder: peft loads it onto the base and reproduces the model
    loaded = peft.PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


def test_model_adapter_config_lists_the_layers_all_linear_matched(load_base, tmp_path):
    model = apply_lora(load_base(), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    targets = model_adapter_config(model)["target_modules"]
    assert targets == sorted(written["target_modules"])
    # 2 layers x 7 linear layers, by full name; not lm_head
    assert len(targets) == 14 and "model.layers.1.mlp.down_proj" in targets and "lm_head" not in targets
    assert model.peft_config["default"].inference_mode is False  # the live config is left as it was


def test_adapters_disabled_is_the_base_model(load_base):
    model = randomize_adapters(apply_lora(load_base(), LoraConfig()))
    base = load_base()
    with torch.no_grad():
        with adapters_disabled(model):
            off = model(IDS).logits
        on = model(IDS).logits
        torch.testing.assert_close(off, base(IDS).logits, rtol=0, atol=1e-6)
    assert (on - off).abs().max() > 1e-3  # the adapters matter, and are back on after the block


def test_export_merge_writes_an_hf_folder_with_the_lora_logits(load_base, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_engine.cli import main
    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead

    model = randomize_adapters(apply_lora(load_base(), LoraConfig(r=8, target_modules="all-linear")))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    AutoModelForCausalLMWithValueHead(model).save_pretrained(ckpt / "policy")  # as a PPO checkpoint holds it
    assert main(["export", "--merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_export_errors_name_the_missing_folder(load_base, tmp_path, capsys):
    from rlhf_engine.cli import main

    model = apply_lora(load_base(), LoraConfig())
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(tmp_path / "policy")
    assert main(["export", "--merge", str(tmp_path / "policy"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "names base model" in err and "gone" in err and "--base" in err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--merge", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "is neither a checkpoint nor a model folder" in capsys.readouterr().err
