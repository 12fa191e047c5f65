"""The tiny policy of the verifiable-math recipe on a CPU: a tokenizer and Llama from scratch, then a
short SFT warm start that teaches the answer format (` #### 7`) with noisy answers.

    python examples/verifiable_math/tiny_model.py --out out/verifiable_math

writes `out/verifiable_math/base` (random init) and `out/verifiable_math/sft` (the policy GRPO starts
from). The warm-start answers are right only `--correct-fraction` of the time (else a random digit), so
the SFT policy samples the right answer about that often: GRPO then has to raise it. A real model
(0.5B-7B) needs no such step: it already knows the format from its instruction tuning.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_data import completion, problems


def build_base(out: Path, seed: int = 0) -> Path:
    """A tokenizer trained on the problems and a randomly initialised tiny Llama, saved in `out`."""
    from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer

    corpus = [p["prompt"] + completion(p["answer"]) for p in problems(2000, seed=seed + 1)]
    tokenizer = build_tokenizer(512, corpus=corpus)
    model = build_llama(TinyLlamaSpec(), tokenizer, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def warm_start(base: Path, out: Path, *, examples: int = 2000, epochs: int = 2, correct_fraction: float = 1.0,
               seed: int = 0) -> Path:
    """SFT of `base` on `examples` problems answered in the ` #### N` format, the answer right with probability
    `correct_fraction` (else a random digit); the result is saved in `out`."""
    from rlhf_engine.trainer.sft import SFTTrainer
    from rlhf_engine.trainer.sft_config import SFTConfig

    rng = random.Random(seed + 2)
    records = []
    for p in problems(examples, seed=seed + 3):
        answer = p["answer"] if rng.random() < correct_fraction else str(rng.randint(0, 9))
        records.append({"prompt": p["prompt"], "completion": completion(answer)})
    out.mkdir(parents=True, exist_ok=True)
    sft_file = out.parent / f"{out.name}.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    SFTTrainer(SFTConfig(model_name_or_path=str(base), train_file=str(sft_file), output_dir=str(out),
                         num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                         warmup_ratio=0.05, max_length=64, logging_steps=20, seed=seed, device="cpu")).train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/verifiable_math"))
    parser.add_argument("--sft-examples", type=int, default=2000)
    parser.add_argument("--correct-fraction", type=float, default=1.0)
    args = parser.parse_args()
    base = build_base(args.out / "base")
    sft = warm_start(base, args.out / "sft", examples=args.sft_examples, correct_fraction=args.correct_fraction)
    print(f"SFT policy: {sft}")


if __name__ == "__main__":
    main()
