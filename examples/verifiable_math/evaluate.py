"""Accuracy of a policy on the recipe's problems: the fraction of sampled answers that are right.

    python examples/verifiable_math/evaluate.py runs/verifiable_math/tiny/sft runs/verifiable_math/grpo/checkpoints/step-00000020/policy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from math_reward import KEY, correct


@torch.no_grad()
def accuracy(model_dir: str | Path, prompts: list[str], *, samples: int = 4, max_new_tokens: int = 4,
             temperature: float = 1.0, seed: int = 0) -> float:
    """Mean exact-match reward of `samples` completions per prompt sampled from the policy in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(samples)]
    enc = tok(repeated, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(correct(repeated, completions)) / len(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policies", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    prompts = KEY.prompts
    for policy in args.policies:
        print(f"{policy}: accuracy {accuracy(policy, prompts, samples=args.samples):.3f}")


if __name__ == "__main__":
    main()
