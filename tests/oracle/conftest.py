"""Models of the TRL oracle tests: the real pretrained model as the reference, and a briefly SFT-trained copy of
it as the policy, so that the policy's log-probs are far from the reference's before any DPO or GRPO step."""

from __future__ import annotations

import pytest
import torch

from tests.oracle.real_models import SFT_LEARNING_RATE, SFT_STEPS, arithmetic_chat


@pytest.fixture(scope="session")
def sft_policy_dir(real_model_dir, tmp_path_factory):
    """The real model after `SFT_STEPS` AdamW steps (lr `SFT_LEARNING_RATE`) on four arithmetic chats with
    `#### N` answers (plain causal-LM loss on every token), saved as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template(arithmetic_chat(a, b), tokenize=False)
             for a, b in ((14, 23), (8, 35), (51, 6), (27, 19))]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE)
    model.train()
    for _ in range(SFT_STEPS):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    folder = tmp_path_factory.mktemp("sft-policy")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
