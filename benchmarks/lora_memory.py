"""Trainer memory a LoRA policy saves in PPO, computed from parameter counts (nothing is timed or guessed).

For each model shape the model is built on the `meta` device (no memory) and peft's own `get_peft_model`
adds the adapters, so both counts are what the trainer would hold:

- reference copy avoided: with LoRA and no `ref_model`, the reference is the policy with its adapters
  disabled; full-weight PPO keeps a frozen copy of the initial policy (N parameters, fp32 or bf16).
- optimizer state: AdamW keeps two fp32 moments per trainable parameter (8 bytes each): all N (+ the value
  head) for a full-weight policy, only the adapters (+ the value head) with LoRA; gradients add 4 bytes per
  trainable parameter.

Shapes: the demo's tiny Llama (`TinyLlamaSpec()`), the 38 M-parameter benchmark Llama
(`benchmarks/e2e/workload.py`) and a Qwen2.5-0.5B-class config (hidden 896, 24 layers, intermediate 4864,
14 heads / 2 KV heads of 64, vocab 151936, tied embeddings). LoRA: r 16 on q, k, v, o.

Usage: python benchmarks/lora_memory.py [--r 16] [--out benchmarks/results/lora_memory.json]
"""

from __future__ import annotations

import argparse

import torch
from provenance import Provenance

MIB = 1 << 20
FP32, BF16 = 4, 2
ADAM_BYTES = 2 * FP32  # exp_avg and exp_avg_sq per trainable parameter
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def shapes() -> dict[str, object]:
    """name -> transformers config of each model shape."""
    from transformers import LlamaConfig, Qwen2Config

    from rlhf_engine.models.tiny import TinyLlamaSpec

    demo = TinyLlamaSpec()
    return {
        "demo (tiny Llama)": LlamaConfig(vocab_size=demo.vocab_size, hidden_size=demo.hidden_size,
                                         intermediate_size=demo.intermediate_size, num_hidden_layers=demo.num_layers,
                                         num_attention_heads=demo.num_heads, num_key_value_heads=demo.num_heads,
                                         tie_word_embeddings=False),
        "bench 38M Llama": LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False),
        "Qwen2.5-0.5B shape": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          tie_word_embeddings=True),
    }


def count(config, r: int) -> dict[str, int]:
    """Parameter counts of the model of `config`: all (tied ones once), the LoRA adapters, the value head."""
    from transformers import AutoModelForCausalLM

    from rlhf_engine.models.lora import LoraConfig, apply_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
        lora = apply_lora(model, LoraConfig(r=r, alpha=2.0 * r, target_modules=TARGETS))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return {"params": total, "adapters": adapters, "value_head": config.hidden_size + 1}


def memory(counts: dict[str, int]) -> dict[str, float]:
    """MiB the trainer holds for the policy, its reference and its optimizer: full weights vs LoRA."""
    n, a, v = counts["params"], counts["adapters"], counts["value_head"]
    full_trainable, lora_trainable = n + v, a + v
    out = {
        "reference_copy_avoided_fp32_mib": n * FP32 / MIB,
        "reference_copy_avoided_bf16_mib": n * BF16 / MIB,
        "adam_state_full_mib": full_trainable * ADAM_BYTES / MIB,
        "adam_state_lora_mib": lora_trainable * ADAM_BYTES / MIB,
        "grads_full_mib": full_trainable * FP32 / MIB,
        "grads_lora_mib": lora_trainable * FP32 / MIB,
    }
    # fp32 policy weights + fp32 reference copy + gradients + Adam, against fp32 weights + adapters' share
    out["total_full_mib"] = ((n + v) * FP32 + n * FP32) / MIB + out["grads_full_mib"] + out["adam_state_full_mib"]
    out["total_lora_mib"] = (n + a + v) * FP32 / MIB + out["grads_lora_mib"] + out["adam_state_lora_mib"]
    out["saved_fraction"] = 1.0 - out["total_lora_mib"] / out["total_full_mib"]
    return out


def table(rows: dict[str, dict], r: int) -> str:
    """The README's markdown table."""
    lines = [f"| model | params | LoRA params (r {r}, q/k/v/o) | reference copy avoided (fp32 / bf16) | "
             "Adam state full → LoRA | gradients full → LoRA | policy + ref + grads + Adam, fp32: full → LoRA |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        c, m = row["counts"], row["mib"]
        lines.append(
            f"| {name} | {c['params'] / 1e6:.2f} M | {c['adapters'] / 1e6:.3f} M "
            f"({100 * c['adapters'] / c['params']:.2f}%) | {m['reference_copy_avoided_fp32_mib']:.1f} / "
            f"{m['reference_copy_avoided_bf16_mib']:.1f} MiB | {m['adam_state_full_mib']:.1f} → "
            f"{m['adam_state_lora_mib']:.2f} MiB | {m['grads_full_mib']:.1f} → {m['grads_lora_mib']:.2f} MiB | "
            f"{m['total_full_mib']:.1f} → {m['total_lora_mib']:.1f} MiB (−{100 * m['saved_fraction']:.0f}%) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--out", default="benchmarks/results/lora_memory.json")
    args = parser.parse_args()
    run = Provenance.start("lora_memory")
    rows = {}
    for name, config in shapes().items():
        counts = count(config, args.r)
        rows[name] = {"counts": counts, "mib": memory(counts)}
    print(table(rows, args.r))
    run.write(args.out, {"r": args.r, "targets": TARGETS, "rows": rows})


if __name__ == "__main__":
    main()
