"""Helpers of the generator tests: perturbed weights, reference log-probs, stop strings, prompts, checks scripts
run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def perturbed_state(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of `model` plus `scale` * N(0, 1) noise (a stand-in for a PPO step)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for name, p in model.named_parameters()
    }


def reference_logprobs(model, completion, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """[T] log-probs of `completion.response_ids` under `model` with the sampler's processing
    (logits / temperature, then top-k renormalisation), fp32."""
    ids = torch.cat([completion.prompt_ids, completion.response_ids])[None]  # [1, P + T]
    with torch.no_grad():
        logits = model(ids).logits[0, len(completion.prompt_ids) - 1 : -1].float()  # [T, V]
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [T, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, completion.response_ids[:, None])[:, 0]


def stop_string_case(tokenizer, tokens: list[int]) -> tuple[str, int]:
    """A stop string taken from inside a greedy response and the length (in tokens) of
    the shortest prefix of `tokens` whose text contains it."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)  # vLLM matches stop strings in text without them
    # three plain ASCII letters after the first character: no partial UTF-8 bytes at the edges
    starts = [i for i in range(1, len(text) - 2) if text[i : i + 3].isascii() and text[i : i + 3].isalpha()]
    if not starts:
        raise AssertionError(f"no 3-letter ASCII window in {text!r}; pick another prompt")
    stop = text[starts[0] : starts[0] + 3]
    for length in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:length], skip_special_tokens=True):
            return stop, length
    raise AssertionError("unreachable: the stop string is a substring of the whole text")


def prompts(tokenizer, k: int) -> list[list[int]]:
    """`k` prompts of different lengths: bos + the first words of synthetic sentences."""
    from rlhf_engine.data.synthetic import synthetic_sentences

    out = []
    for i, sentence in enumerate(synthetic_sentences(k, seed=7)):
        words = sentence.split()[: 2 + i % 4]
        out.append([tokenizer.bos_token_id, *tokenizer(" ".join(words)).input_ids])
    return out


def random_adapters(specs, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """`scale` * N(0, 1) values for every (name, shape, dtype) adapter spec: lora_B nonzero, so the
    adapters change the model (peft's own init has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=g) for name, shape, _ in specs}


def peft_reference(model_dir, lora, adapters: dict[str, torch.Tensor] | None = None):
    """An fp32 transformers copy of `model_dir` wrapped with `apply_lora(lora)`, in eval mode, holding
    `adapters` (peft's saved names) loaded by peft itself."""
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rlhf_engine.models.lora import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora).eval()
    if adapters is not None:
        result = set_peft_model_state_dict(model, adapters)
        assert not result.unexpected_keys, result.unexpected_keys
    return model


def run_until(gen, steps: int | None = None) -> list:
    """Step `gen` `steps` times (None: until nothing runs); the finished (tag, sample) pairs."""
    out = []
    while gen.running and (steps is None or steps > 0):
        out += gen.step()
        steps = None if steps is None else steps - 1
    return out


def run_checks(module: str, *args: str) -> str:
    """The stdout of `python -m module *args` run from the repository root, which must exit with status 0: a
    checks script with its vLLM engine in its own process (in process, vLLM takes over torch.set_num_threads)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout
