"""The tiny policy of the verifiable-math recipe on a CPU: a tokenizer and Llama from scratch, then a
short SFT warm start.

    python examples/verifiable_math/tiny_model.py --out runs/verifiable_math/tiny

writes `runs/verifiable_math/tiny/base` (random init) and `.../tiny/sft` (the policy GRPO starts
from). The warm start is deliberately short (1000 examples, one epoch, ~30 optimizer steps) and states
only half of its answers in the checkable ` #### 7` format (the rest as a bare ` 7`): the SFT policy
gets few answers right in a checkable form, and GRPO has both the format and the sums to improve. A real
model (0.5B-7B) needs no such step: it already answers in a format from its instruction tuning.
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


def warm_start(base: Path, out: Path, *, examples: int = 1000, epochs: int = 1, marked_fraction: float = 0.5,
               seed: int = 0) -> Path:
    """SFT of `base` on `examples` problems with their right answers, a fraction `marked_fraction` of them in
    the checkable ` #### N` format and the rest as a bare ` N`; the result is saved in `out`."""
    from rlhf_engine.trainer.stages.sft import SFTTrainer
    from rlhf_engine.trainer.stages.sft_config import SFTConfig

    rng = random.Random(seed + 2)
    records = [{"prompt": p["prompt"], "completion": completion(p["answer"]) if rng.random() < marked_fraction
                else f" {p['answer']}"} for p in problems(examples, seed=seed + 3)]
    out.mkdir(parents=True, exist_ok=True)
    sft_file = out.parent / f"{out.name}.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    SFTTrainer(SFTConfig(model_name_or_path=str(base), train_file=str(sft_file), output_dir=str(out),
                         num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                         warmup_ratio=0.05, max_length=64, logging_steps=20, seed=seed, device="cpu")).train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/verifiable_math/tiny"))
    parser.add_argument("--sft-examples", type=int, default=1000)
    parser.add_argument("--marked-fraction", type=float, default=0.5)
    args = parser.parse_args()
    base = build_base(args.out / "base")
    sft = warm_start(base, args.out / "sft", examples=args.sft_examples, marked_fraction=args.marked_fraction)
    print(f"SFT policy: {sft}")


if __name__ == "__main__":
    main()
