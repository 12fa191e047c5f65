"""GGUF model files as HF folders: the real model the tests use, and the converter's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhf_engine.models.end_of_turn import end_of_turn_ids
from rlhf_engine.models.gguf import ConversionError, convert_gguf


@pytest.mark.real_model
def test_the_real_model_folder_is_smollm2_with_its_chat_template(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((real_model_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"], config["hidden_size"],
            config["tie_word_embeddings"]) == ("llama", 49152, 30, 576, True)
    assert "quantization_config" not in config
    assert json.loads((real_model_dir / "generation_config.json").read_text())["eos_token_id"] == [2]
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Compute 4 + 7."}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nCompute 4 + 7.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # a pretrained instruct model: it does the sum (greedy)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert "11" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_end_of_turn_ids_take_the_declared_list_and_the_tokenizers_eos():
    class Tok:
        eos_token_id = 151643

    assert end_of_turn_ids(Tok(), [151645, 151643]) == (151645, 151643)
    assert end_of_turn_ids(Tok(), 151645) == (151645, 151643)
    assert end_of_turn_ids(Tok(), None) == (151643,)


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match=r"odd.gguf: transformers cannot load it \(ValueError: GGUF model "
                                              r"with architecture notanarch is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_refuses_what_is_no_gguf_file_or_an_existing_folder(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"model.bin: not a .gguf file"):
        convert_gguf(tmp_path / "model.bin", tmp_path / "out")
    (tmp_path / "m.gguf").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="exists already"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_cli_names_the_converter_when_a_gguf_file_is_given_as_the_policy(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "run.yaml").write_text(f"model: {{policy: {tmp_path / 'm.gguf'}, reward_fn: rlhf_engine.demo:gold_scores}}\n"
                                       f"data: {{prompts: {tmp_path / 'p.jsonl'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "ppo", "--config", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "rlhf-engine" in line]
    assert lines == [f"rlhf-engine ppo: config error: model.policy: {tmp_path / 'm.gguf'} is a GGUF file, not a model "
                     f"folder: convert it once with `rlhf-engine convert-gguf {tmp_path / 'm.gguf'} OUT` and name OUT"]


def test_cli_convert_gguf_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "convert-gguf", str(tmp_path / "x.gguf"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rlhf-engine convert-gguf: conversion error: {tmp_path / 'x.gguf'}: no such file"
