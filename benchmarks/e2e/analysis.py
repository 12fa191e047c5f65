"""Numbers of the end-to-end benchmark, computed from what a variant recorded (pure functions).

Steady state: a run of N steps is measured from the end of step `warmup` to the end of step N
(the step-end times in metrics.jsonl), which leaves out the first vLLM call and the pipeline
fill; whole-run numbers (from the generators' handshake to the end of step N) are kept beside.

Phases of a step (the trainer's `time/ppo/*` and the engine's `time/engine/*` metrics):
  generate          a generator's seconds for one batch (timeline `generate` intervals, stamped by the
                    generator itself: `Sample.finished_at`)
  experience_fwd    policy/value and reference forward passes (`time/ppo/forward_pass`)
  rewards           KL-shaped rewards (`compute_rewards`)
  advantages        GAE / group advantages (`compute_advantages`)
  update            PPO epochs over minibatches (`optimize_step`)
  score_other       the rest of `time/ppo/total`: scoring with the reward function, checks, stats
  weight_sync       publishing the new weights (`time/engine/weight_sync`)
  wait_rollouts     the trainer waiting for the step's batch (`time/engine/wait_rollouts`)
Trainer busy per step T_train = step - wait_rollouts; the generator's T_gen = its batch time.
Ideal overlap bound: (T_gen + T_train) / max(T_gen, T_train) from the sync run of a setting;
achieved: sync seconds per step / async seconds per step.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rlhf_engine.telemetry.timeline import idle_fractions

PHASES = {
    "experience_fwd": "time/ppo/forward_pass",
    "rewards": "time/ppo/compute_rewards",
    "advantages": "time/ppo/compute_advantages",
    "update": "time/ppo/optimize_step",
    "weight_sync": "time/engine/weight_sync",
    "wait_rollouts": "time/engine/wait_rollouts",
}
PPO_PARTS = ("time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages",
             "time/ppo/optimize_step")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def steady_window(result: dict, warmup: int) -> tuple[float, float]:
    """(start, end) wall-clock seconds of steps warmup+1 .. N."""
    rows = result["rows"]
    start = rows[warmup - 1]["time"] if warmup > 0 else result["t_start"]
    return start, rows[-1]["time"]


def phase_times(rows: list[dict], warmup: int) -> dict[str, float]:
    """Mean seconds per steady step of each trainer-side phase, plus `step` and `train` (= T_train)."""
    steady = rows[warmup:]
    out = {name: _mean([r[key] for r in steady if key in r]) for name, key in PHASES.items()}
    out["score_other"] = _mean([r["time/ppo/total"] - sum(r[k] for k in PPO_PARTS) for r in steady
                                if "time/ppo/total" in r])
    out["step"] = _mean([r["time/engine/step"] for r in steady])
    out["train"] = _mean([r["time/engine/step"] - r["time/engine/wait_rollouts"] for r in steady])
    return out


def generate_times(timeline: list[dict], warmup: int) -> list[float]:
    """Seconds of each generated batch after the first `warmup` ones, in the order they were recorded."""
    gens = sorted((iv for iv in timeline if iv["phase"] == "generate"), key=lambda iv: iv["end"])
    return [iv["end"] - iv["start"] for iv in gens[warmup:]]


def overlap_bound(t_gen: float, t_train: float) -> float:
    """(T_gen + T_train) / max(T_gen, T_train): the speed-up of perfect overlap over alternation."""
    return (t_gen + t_train) / max(t_gen, t_train)


def summarize(result: dict, *, warmup: int, batch_size: int, num_generators: int = 1) -> dict[str, Any]:
    """Throughput, phase times, idle fractions, score and KL of one variant (`idle_generator`: the
    mean over its generators of the fraction of the steady window each sat idle)."""
    rows = result["rows"]
    start, end = steady_window(result, warmup)
    steady = rows[warmup:]
    span = max(end - start, 1e-9)
    tokens = sum(r.get("env/generated_tokens", 0.0) for r in steady)
    phases = phase_times(rows, warmup)
    gen = generate_times(result["timeline"], warmup)
    idle = idle_fractions(result["timeline"], start, end)
    gen_names = [f"generator-{i}" for i in range(num_generators)]
    whole = max(rows[-1]["time"] - result["t_start"], 1e-9)
    loop = result.get("loop_stats", {})
    whole_gen_idle = {name: 1.0 - (s["generate_s"] + s["update_s"]) / whole for name, s in loop.items()}
    if gen:  # generators stamp their batches (Sample.finished_at): steady-window numbers
        gen_source = "timeline"
        phases["generate"] = _mean(gen)
        gen_idle = {name: idle.get(name, 1.0) for name in gen_names}
    else:  # the generators did not stamp their batches: sync waits for exactly one batch per step
        gen_source = "sync: trainer's wait for rollouts; idle: none in the steady window"
        phases["generate"] = phases["wait_rollouts"] if result.get("mode") == "sync" else float("nan")
        gen_idle = {name: float("nan") for name in gen_names}
    last = rows[-min(3, len(rows)):]
    return {
        "steps": len(rows),
        "steady_steps": len(steady),
        "steady_s": span,
        "s_per_step": span / len(steady),
        "samples_per_s": len(steady) * batch_size / span,
        "tokens_per_s": tokens / span,
        "whole_run_s": whole,
        "whole_run_samples_per_s": len(rows) * batch_size / whole,
        "phases_s": phases,
        "idle_trainer": idle.get("trainer", 1.0),
        "idle_generator": _mean(list(gen_idle.values())),
        "idle_generators": gen_idle,
        "idle_generators_whole_run": whole_gen_idle,
        "generator_numbers_from": gen_source,
        "reward_first": rows[0].get("env/reward_mean"),
        "reward_last3": _mean([r["env/reward_mean"] for r in last if "env/reward_mean" in r]),
        "gold_last3": _mean([r["env/gold_mean"] for r in last if "env/gold_mean" in r]),
        # standard error of reward_last3: per-sample std over the len(last) * batch_size samples behind it
        "reward_last3_se": _mean([r["env/reward_std"] for r in last if "env/reward_std" in r])
        / math.sqrt(len(last) * batch_size),
        "kl_mean": _mean([r["objective/kl"] for r in steady if "objective/kl" in r]),
        "kl_last": rows[-1].get("objective/kl"),
        "staleness_mean": _mean([r.get("off_policy/staleness_mean", 0.0) for r in steady]),
        "peak_rss_mib": result.get("peak_rss_mib", {}),
    }


def compare_async(sync: dict, asyncs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Ideal bound from the sync run's phases beside each async run's achieved speed-up."""
    t_gen, t_train = sync["phases_s"]["generate"], sync["phases_s"]["train"]
    bound = overlap_bound(t_gen, t_train)
    out = {}
    for name, s in asyncs.items():
        achieved = sync["s_per_step"] / s["s_per_step"]
        bottleneck = "generator" if t_gen > t_train else "trainer"
        idle = s["idle_trainer"] if bottleneck == "trainer" else s["idle_generator"]
        out[name] = {"t_gen": t_gen, "t_train": t_train, "ideal_bound": bound, "achieved": achieved,
                     "fraction_of_bound": achieved / bound,
                     # share of the possible gain realised: 1 = perfect overlap, 0 = no better than sync
                     "gain_captured": (achieved - 1.0) / (bound - 1.0) if bound > 1.0 else float("nan"),
                     "bottleneck": bottleneck, "bottleneck_idle": idle,
                     # final score against sync's, and the noise of that difference (1 standard error)
                     "reward_diff": s["reward_last3"] - sync["reward_last3"],
                     "reward_diff_se": math.hypot(s["reward_last3_se"], sync["reward_last3_se"])}
    return out
