"""`rlhf-engine demo`: the whole pipeline on a tiny built-in task, from nothing, on a CPU.

1. a byte-level BPE tokenizer and a small Llama, built from scratch (no hub);
2. SFT on synthetic sentences that continue with sentiment words (`rlhf_engine.data.synthetic`);
3. a reward model trained on synthetic preference pairs labelled by the task's gold reward
   (#positive − #negative words);
4. async PPO against that reward model, with the vLLM generator in its own process;
5. a summary: gold score of the SFT policy vs the PPO policy on held-out prompts, reward-model
   accuracy, final KL, tokens/s, idle fractions, and where the run directory and plots are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_engine.data import synthetic


def gold_scores(prompts: list[str], completions: list[str]) -> list[float]:
    """The task's true metric, in the `fn(prompts, completions)` form that `model.gold_fn` takes."""
    return synthetic.gold_rewards(completions)


@dataclass(frozen=True)
class DemoBudget:
    """How much work each stage does."""

    sft_examples: int = 3000
    sft_epochs: int = 2
    rm_pairs: int = 2000
    rm_epochs: int = 1
    ppo_steps: int = 40
    ppo_batch_size: int = 32
    eval_prompts: int = 128


FULL = DemoBudget()
SMALL = DemoBudget(sft_examples=200, sft_epochs=1, rm_pairs=200, rm_epochs=1, ppo_steps=2, ppo_batch_size=8,
                   eval_prompts=16)

RESPONSE_LENGTH = 16


@torch.no_grad()
def mean_gold(model_dir: str | Path, prompts: list[str], seed: int = 0) -> float:
    """Mean gold score of completions sampled (temperature 1) from the policy in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=RESPONSE_LENGTH, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(gold_scores(prompts, completions)) / len(completions)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_demo(out: Path, *, ppo_steps: int | None = None, small: bool = False, backend: str = "auto") -> dict:
    """Run the demo into `out`, print the summary table, and return its numbers."""
    from rlhf_engine.engine.config import load_run_config
    from rlhf_engine.engine.core import RLHFEngine
    from rlhf_engine.models.tiny import make_tiny_model_dir
    from rlhf_engine.trainer.stages.reward import RewardTrainer
    from rlhf_engine.trainer.stages.reward_config import RewardConfig
    from rlhf_engine.trainer.stages.sft import SFTTrainer
    from rlhf_engine.trainer.stages.sft_config import SFTConfig

    budget = SMALL if small else FULL
    steps = ppo_steps if ppo_steps is not None else budget.ppo_steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    times = {}

    # 1. tokenizer + tiny Llama from scratch
    print("[demo] 1/5 building a tiny tokenizer and Llama from scratch")
    base = make_tiny_model_dir(out / "base")

    # 2. SFT: the format of the task (sentence start -> adverb + sentiment words)
    print("[demo] 2/5 supervised fine-tuning")
    t0 = time.time()
    sft_data = _write_jsonl(out / "sft.jsonl", synthetic.sft_records(budget.sft_examples, seed=1))
    sft = SFTTrainer(SFTConfig(model_name_or_path=str(base), train_file=str(sft_data), output_dir=str(out / "sft"),
                               num_train_epochs=budget.sft_epochs, per_device_train_batch_size=32,
                               learning_rate=3e-3, warmup_ratio=0.05, max_length=64, logging_steps=20,
                               device="cpu"))
    sft_metrics = sft.train()
    times["sft"] = time.time() - t0

    # 3. reward model on gold-labelled preference pairs
    print("[demo] 3/5 reward model")
    t0 = time.time()
    pairs = _write_jsonl(out / "preferences.jsonl", synthetic.preference_records(budget.rm_pairs, seed=2))
    rm = RewardTrainer(RewardConfig(model_name_or_path=str(out / "sft"), train_file=str(pairs),
                                    output_dir=str(out / "reward"), eval_split=0.1, num_train_epochs=budget.rm_epochs,
                                    per_device_train_batch_size=32, learning_rate=1e-3, warmup_ratio=0.05,
                                    max_length=64, logging_steps=20, device="cpu"))
    rm_metrics = rm.train()
    times["reward"] = time.time() - t0

    # 4. async PPO with the generator in its own process
    print("[demo] 4/5 async PPO")
    t0 = time.time()
    prompts_file = _write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in synthetic.prompts(1024, seed=3)])
    config = load_run_config(None, base={
        "model": {"policy": str(out / "sft"), "reward_model": str(out / "reward"),
                  "gold_fn": "rlhf_engine.demo:gold_scores"},
        "data": {"prompts": str(prompts_file), "max_prompt_length": 32},
        "ppo": {"batch_size": budget.ppo_batch_size, "mini_batch_size": budget.ppo_batch_size // 2,
                "ppo_epochs": 2, "learning_rate": 3e-4, "init_kl_coef": 0.1, "adap_kl_ctrl": True,
                "target": 4.0, "horizon": 400.0,
                "response_length": RESPONSE_LENGTH, "vf_coef": 0.5, "max_grad_norm": 1.0, "seed": 0},
        "generator": {"backend": backend, "max_model_len": 128, "kv_cache_bytes": 1 << 27},
        "transport": {"endpoint": f"ipc://{out.resolve()}/engine"},
        "engine": {"run_dir": str(out / "ppo"), "total_steps": steps, "mode": "async", "max_staleness": 1,
                   "loggers": ["jsonl"]},
    })
    with RLHFEngine(config) as engine:
        history = engine.train()
        summary = engine.summary()
        engine.trainer.save_pretrained(out / "ppo_trained")
    times["ppo"] = time.time() - t0

    # 5. evaluation on held-out prompts and the summary
    print("[demo] 5/5 evaluating SFT vs PPO policy on held-out prompts")
    from rlhf_engine.telemetry.plots import plot_run

    plots = plot_run(out / "ppo")
    held_out = synthetic.prompts(budget.eval_prompts, seed=4)
    result = {
        "gold_sft": mean_gold(out / "sft", held_out),
        "gold_ppo": mean_gold(out / "ppo_trained" / "policy", held_out),
        "rm_accuracy": rm_metrics.get("eval/accuracy", float("nan")),
        "sft_loss_first": sft_metrics.get("train/first_loss", float("nan")),
        "sft_loss_last": sft_metrics.get("train/loss", float("nan")),
        "final_kl": history[-1].get("objective/kl", float("nan")),
        "reward_first": history[0].get("env/reward_mean", float("nan")),
        "reward_last": history[-1].get("env/reward_mean", float("nan")),
        "ppo_steps": len(history),
        "generated_tokens_per_s": summary["generated_tokens_per_s"],
        "idle_fraction": summary["idle_fraction"],
        "times_s": {**times, "total": time.time() - t_start},
        "run_dir": str(out / "ppo"),
        "plots": str(plots[0].parent) if plots else None,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    _print_summary(result)
    return result


def _print_summary(r: dict) -> None:
    idle = r["idle_fraction"]
    rows = [
        ("gold score, SFT policy", f"{r['gold_sft']:+.3f}"),
        ("gold score, PPO policy", f"{r['gold_ppo']:+.3f}"),
        ("reward-model eval accuracy", f"{r['rm_accuracy']:.3f}"),
        ("SFT loss first -> last", f"{r['sft_loss_first']:.3f} -> {r['sft_loss_last']:.3f}"),
        ("PPO reward (RM) first -> last", f"{r['reward_first']:+.3f} -> {r['reward_last']:+.3f}"),
        ("final KL to reference", f"{r['final_kl']:.3f}"),
        ("PPO steps", str(r["ppo_steps"])),
        ("generated tokens/s", f"{r['generated_tokens_per_s']:.0f}"),
        ("idle fraction trainer / generator",
         f"{idle.get('trainer', float('nan')):.2f} / {idle.get('generator-0', float('nan')):.2f}"),
        ("time sft / reward / ppo / total (s)",
         " / ".join(f"{r['times_s'][k]:.0f}" for k in ("sft", "reward", "ppo", "total"))),
        ("run dir", r["run_dir"]),
        ("plots", str(r["plots"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 30))
