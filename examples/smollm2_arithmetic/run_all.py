"""The whole recipe on SmolLM2-135M-Instruct, stage by stage, as a user runs it, and its figures.

    python examples/smollm2_arithmetic/run_all.py [--only grpo,sft,reward,dpo,ppo] [--out runs/smollm2_arithmetic]

Each stage is the `rlhf-engine` command its YAML names (README.md here); the figures come from the stages'
metrics.jsonl: held-out strict accuracy before/after (GRPO, PPO), held-out loss (SFT), held-out accuracy
(reward model), held-out margin (DPO). Prints a table and writes benchmarks/results/smollm2_recipe_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STAGES = ("grpo", "sft", "reward", "dpo", "ppo")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_last(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if key in r]
    return values[0], values[-1]


def run(stage: str) -> float:
    """Run one stage's command from the repository root; its wall time."""
    command = "ppo" if stage in ("grpo", "ppo") else stage
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = ROOT / "runs" / "smollm2_arithmetic" / stage
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "rlhf_engine.cli", command, "--config", str(HERE / f"{stage}.yaml")],
                   cwd=ROOT, env=env, check=True)
    if stage in ("grpo", "ppo"):
        subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "plot", str(out)], cwd=ROOT, check=True)
    return time.time() - t0


def figures(stage: str) -> dict[str, float]:
    rows = records(ROOT / "runs" / "smollm2_arithmetic" / stage / "metrics.jsonl")
    if stage in ("grpo", "ppo"):
        (acc0, acc1), (rew0, rew1) = first_last(rows, "eval/gold_mean"), first_last(rows, "eval/reward_mean")
        out = {"eval_accuracy_before": acc0, "eval_accuracy_after": acc1, "eval_reward_before": rew0,
               "eval_reward_after": rew1, "train_reward_first": first_last(rows, "env/reward_mean")[0],
               "train_reward_last": first_last(rows, "env/reward_mean")[1]}
        kl = [r["objective/kl"] for r in rows if "objective/kl" in r]
        return {**out, "kl_max": max(kl), "kl_last": kl[-1]}
    if stage == "sft":
        before, after = first_last(rows, "eval/loss")
        return {"eval_loss_before": before, "eval_loss_after": after}
    if stage == "reward":
        before, after = first_last(rows, "eval/accuracy")
        return {"eval_accuracy_before": before, "eval_accuracy_after": after}
    before, after = first_last(rows, "eval/rewards/margins")
    acc = first_last(rows, "eval/rewards/accuracies")
    return {"eval_margin_before": before, "eval_margin_after": after, "eval_pair_accuracy_before": acc[0],
            "eval_pair_accuracy_after": acc[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--no-run", action="store_true", help="only collect the figures of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smollm2_recipe_cpu.json"))
    args = parser.parse_args()
    subprocess.run([sys.executable, str(HERE / "make_data.py"), str(ROOT / "runs" / "smollm2_arithmetic" / "data")],
                   check=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "SmolLM2-135M-Instruct (fp32, CPU)",
              "cores": os.cpu_count(), "stages": {}}
    for stage in args.only.split(","):
        seconds = None if args.no_run else run(stage)
        result["stages"][stage] = {**figures(stage), "wall_s": seconds}
    result["load_average_at_end"] = os.getloadavg()
    for stage, figs in result["stages"].items():
        print(f"{stage:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in figs.items() if v is not None))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
