"""Generate the arithmetic word problems of the verifiable-math recipe (deterministic in --seed).

    python examples/verifiable_math/make_data.py --out examples/verifiable_math/problems.jsonl

Each line is `{"prompt": ..., "answer": "7"}`: one addition or subtraction of single digits whose
result is a single digit too ("Ana has 3 pens and gets 4 more. How many pens does Ana have now?").
`--completions` also writes the worked answer (" #### 7") as `completion`, the SFT format.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Tom", "Ana", "Sam", "Lia", "Max", "Eva")
THINGS = ("apples", "pens", "cards", "books", "coins", "cups")


def problem(rng: random.Random) -> dict[str, str]:
    """One problem `{"prompt", "answer"}`: `a + b` or `a - b`, operands and result in 0..9."""
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        prompt, answer = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", a + b
    else:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        prompt, answer = f"{name} has {a} {things} and gives away {b}. How many {things} are left?", a - b
    return {"prompt": prompt, "answer": str(answer)}


def completion(answer: str) -> str:
    """The answer in the recipe's format (what `rlhf_engine.rewards.extract_answer` reads)."""
    return f" #### {answer}"


def problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct problems (distinct prompts), deterministic in `seed`."""
    rng = random.Random(seed)
    out: dict[str, dict[str, str]] = {}
    while len(out) < n:
        p = problem(rng)
        out.setdefault(p["prompt"], p)
    return list(out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("problems.jsonl"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--completions", action="store_true", help="add the SFT `completion` field")
    args = parser.parse_args()
    records = problems(args.n, args.seed)
    if args.completions:
        records = [{**r, "completion": completion(r["answer"])} for r in records]
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} problems to {args.out}")


if __name__ == "__main__":
    main()
