"""The recipe's data, from one seed: single-digit additions asked in chat, split into train and held-out.

    python examples/smollm2_arithmetic/make_data.py OUT_DIR

writes into OUT_DIR:
  train.jsonl / eval.jsonl  {"prompt": [chat messages], "answer": "11"}: the RL prompts (disjoint pairs)
  sft.jsonl                 {"messages": [user, assistant]}: the answer worked and stated as `#### N`
  pairs.jsonl               {"prompt": [...], "chosen": [...], "rejected": [...]}: the right sum stated as
                            `#### N` vs a near miss without that line
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QUESTION = "What is {a} + {b}? Show the sum, then write it once more after '####', like this:\n2 + 3 = 5\n#### 5"
"""The instruct model writes this format 21 % of the time at temperature 0.7 (its sums are right about a third
of the time): GRPO has something to start from."""
EVAL_PAIRS = 24
"""Held out of the 80 pairs (a, b) in 1..9 x 1..9 (but the example 2 + 3): never a training prompt."""


def user(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def answer(a: int, b: int, total: int) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"{a} + {b} = {total}\n#### {total}"}]


def split(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held-out) operand pairs."""
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a, b) != (2, 3)]  # not the prompt's example
    random.Random(seed).shuffle(pairs)
    return pairs[EVAL_PAIRS:], pairs[:EVAL_PAIRS]


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write the four files into `out`; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split(seed)
    rng = random.Random(seed + 1)
    wrong = lambda a, b: a + b + rng.choice([-2, -1, 1, 2])  # noqa: E731  (a near miss, never the sum)
    # rejected: a near miss, stated without the checkable line (what the instruct model writes unprompted)
    rejected = lambda a, b: [{"role": "assistant", "content": f"{a} + {b} = {wrong(a, b)}."}]  # noqa: E731
    rows = {
        "train": [{"prompt": user(a, b), "answer": str(a + b)} for a, b in train],
        "eval": [{"prompt": user(a, b), "answer": str(a + b)} for a, b in held_out],
        "sft": [{"messages": user(a, b) + answer(a, b, a + b)} for a, b in train],
        "pairs": [{"prompt": user(a, b), "chosen": answer(a, b, a + b), "rejected": rejected(a, b)}
                  for a, b in train],
    }
    paths = {}
    for name, records in rows.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2_arithmetic/data")).items():
        print(f"{name}: {path}")
