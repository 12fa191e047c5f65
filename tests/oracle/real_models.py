"""What both oracle tests build their models and data from (the fixtures are in `conftest.py`)."""

from __future__ import annotations

import torch

SFT_STEPS = 2
SFT_LEARNING_RATE = 1e-4
SYSTEM = {"role": "system", "content": "Be brief."}
"""A short system turn: without one the template adds its own 20-token system prompt to every sequence."""


def arithmetic_chat(a: int, b: int) -> list[dict[str, str]]:
    """A user question and the answer in the checkable `#### N` format the base model never writes."""
    return [SYSTEM, {"role": "user", "content": f"Compute {a} + {b}."},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}]


def load_pair(policy_dir, ref_dir):
    """(tokenizer, policy, reference): fresh fp32 copies, the reference frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval().requires_grad_(False)
    return tokenizer, policy, ref
