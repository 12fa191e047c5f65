"""The SFT and DPO stages' optimizer step in fp32 against `bf16` (autocast), side by side in one run, on a model
folder (the real one: `make real-model` writes SmolLM2-135M-Instruct to .cache/real-model) and the
smollm2_arithmetic recipe's data.

    python benchmarks/bench_stages.py --model .cache/real-model/SmolLM2-135M-Instruct [--steps 4] [--out PATH]

Each variant trains `--steps` optimizer steps of 8 examples (pairs for DPO) of at most 128 tokens; the time is
the forward and backward of each step (`_step`), the first step left out (warm-up). The variants alternate twice,
so both see the same machine. Prints a table and writes JSON (machine, versions, date, load average) to
benchmarks/results/stages_cpu.json. Compare only the ratio of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from provenance import Provenance  # noqa: E402

from rlhf_engine.trainer.stages.dpo import DPOTrainer  # noqa: E402
from rlhf_engine.trainer.stages.dpo_config import DPOConfig  # noqa: E402
from rlhf_engine.trainer.stages.sft import SFTTrainer  # noqa: E402
from rlhf_engine.trainer.stages.sft_config import SFTConfig  # noqa: E402

STAGES = {"sft": (SFTTrainer, SFTConfig, "sft"), "dpo": (DPOTrainer, DPOConfig, "pairs")}


def recipe_data(folder: Path) -> dict[str, Path]:
    """The smollm2_arithmetic recipe's data files (`make_data.write`)."""
    spec = importlib.util.spec_from_file_location("smollm2_make_data", ROOT / "examples" / "smollm2_arithmetic" /
                                                  "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(folder)


def step_times(stage: str, bf16: bool, model: str, data: dict[str, Path], steps: int, out: Path) -> list[float]:
    trainer_cls, config_cls, data_key = STAGES[stage]
    config = config_cls(model_name_or_path=model, train_file=str(data[data_key]), output_dir=str(out),
                        per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-6, logging_steps=steps,
                        max_length=128, seed=0, bf16=bf16)
    trainer = trainer_cls(config)
    step, times = trainer._step, []

    def timed(group):
        t0 = time.perf_counter()
        metrics = step(group)
        times.append(time.perf_counter() - t0)
        return metrics

    trainer._step = timed
    trainer.train()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF causal-LM folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is warm-up)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stages_cpu.json")
    args = parser.parse_args()
    run = Provenance.start("stages")
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = recipe_data(Path(tmp) / "data")
        for _ in range(2):
            for stage in STAGES:
                for bf16 in (False, True):
                    name = f"{stage} {'bf16' if bf16 else 'fp32'}"
                    rows.setdefault(name, []).extend(step_times(stage, bf16, args.model, data, args.steps,
                                                                Path(tmp) / name.replace(" ", "_")))
    result = {
        "model": args.model, "threads": torch.get_num_threads(),
        "variants": {name: {"median_s": statistics.median(t), "best_s": min(t), "steps": len(t)}
                     for name, t in rows.items()},
    }
    print(f"{args.model}: optimizer step of 8 examples (DPO: pairs), <= 128 tokens, {torch.get_num_threads()} threads, "
          f"native bf16: {run.machine['native_bf16']}")
    print(f"{'variant':<10}{'median s':>10}{'best s':>9}{'fp32 / it':>11}")
    for name, r in result["variants"].items():
        base = result["variants"][name.split()[0] + " fp32"]["median_s"]
        print(f"{name:<10}{r['median_s']:>10.2f}{r['best_s']:>9.2f}{base / r['median_s']:>10.2f}x")
    run.write(args.out, result)


if __name__ == "__main__":
    main()
