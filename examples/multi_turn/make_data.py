"""Data (and, for the tiny runs, a policy) of the multi-turn examples.

    python examples/multi_turn/make_data.py            # -> runs/multi_turn/data/*.jsonl, runs/multi_turn/tiny

- `guess_train.jsonl` / `guess_eval.jsonl`: `{"prompt": "guess", "target": t}`, t in 0..9 (GuessNumber renders
  its own opening from the record);
- `calc_train.jsonl` / `calc_eval.jsonl`: `{"question": "What is 37 * 12?", "answer": 444, "prompt": ...}`
  two-digit products and sums (Arithmetic renders the question with its system prompt), train and eval disjoint;
- `calc_sft.jsonl`: 200 worked episodes for a short SFT warm start of the calculator example (half call the tool
  and answer with its result, half answer at once), from questions neither train nor eval holds;
- `tiny/`: the tiny random Llama of the tests with an append-only chat template (`TINY_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def guesses(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "guess", "target": rng.randint(0, 9)} for _ in range(n)]


def questions(seed: int) -> list[dict]:
    """Every `a * b` and `a + b` with two-digit a, b, shuffled."""
    rows = [{"question": f"What is {a} {op} {b}?", "answer": a * b if op == "*" else a + b}
            for a in range(10, 100) for b in range(10, 100) for op in "*+"]
    random.Random(seed).shuffle(rows)
    return [{"prompt": r["question"], **r} for r in rows]


def sft_episodes(rows: list[dict]) -> list[dict]:
    """Chat transcripts in `Arithmetic`'s format: every other one calls the calculator, the rest answer at once."""
    from rlhf_engine.envs.arithmetic import SYSTEM_PROMPT

    out = []
    for i, r in enumerate(rows):
        expression = r["question"].removeprefix("What is ").removesuffix("?")
        turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": r["question"]}]
        if i % 2 == 0:
            turns += [{"role": "assistant", "content": f"<calc>{expression}</calc>"},
                      {"role": "tool", "content": str(r["answer"])}]
        turns.append({"role": "assistant", "content": f"Answer: {r['answer']}"})
        out.append({"messages": turns})
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multi_turn")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write(data / "guess_train.jsonl", guesses(512, seed=0))
    write(data / "guess_eval.jsonl", [{"prompt": "guess", "target": t} for t in range(10)])
    rows = questions(seed=0)
    write(data / "calc_train.jsonl", rows[:1000])
    write(data / "calc_eval.jsonl", rows[-32:])
    write(data / "calc_sft.jsonl", sft_episodes(rows[1000:1200]))

    from rlhf_engine.models.tiny import TINY_CHAT_TEMPLATE, TinyLlamaSpec, make_tiny_model_dir

    make_tiny_model_dir(out / "tiny", TinyLlamaSpec(), chat_template=TINY_CHAT_TEMPLATE)
    print(f"wrote {data} and {out / 'tiny'}")


if __name__ == "__main__":
    main()
