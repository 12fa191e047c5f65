"""Presentation of the end-to-end benchmark: the tables, the Gantt chart (the machine and versions:
`benchmarks/provenance.py`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from e2e.analysis import compare_async


def count_parameters(model_dir: str) -> int:
    """Parameters of the safetensors weights in `model_dir` (read from the headers, no model load)."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def trl_summary(result: dict, *, warmup: int, batch_size: int) -> dict[str, Any]:
    """TRL's steady-state seconds per step (steps after `warmup`), samples/s, tokens/s, reward and KL."""
    steps = result["step_s"]
    steady = steps[warmup:] if len(steps) > warmup else steps
    logs = [entry for entry in result["logs"] if "completions/mean_length" in entry]
    lengths = [entry["completions/mean_length"] for entry in logs[warmup:]] or [float("nan")]
    s_per_step = statistics.fmean(steady)
    last = logs[-min(3, len(logs)):]
    return {
        "steps": len(steps),
        "steady_steps": len(steady),
        "s_per_step": s_per_step,
        "samples_per_s": batch_size / s_per_step,
        "tokens_per_s": batch_size * statistics.fmean(lengths) / s_per_step,
        "mean_completion_length": statistics.fmean(lengths),
        "reward_first": logs[0].get("reward") if logs else None,
        "reward_last3": statistics.fmean([entry["reward"] for entry in last]) if last else None,
        "kl_last": logs[-1].get("kl") if logs else None,
        "trl_step_time_s": [entry.get("step_time") for entry in logs],
        "peak_rss_mib": result.get("peak_rss_mib", {}),
    }


def overlap_table(variants: dict[str, dict]) -> dict[str, dict]:
    """Per setting: the sync run's ideal overlap bound beside each async run's achieved speed-up."""
    out = {}
    for setting in ("pinned", "unpinned"):
        sync = variants.get(f"{setting}/sync", {}).get("summary")
        if sync is None:
            continue
        asyncs = {name: v["summary"] for name, v in variants.items()
                  if name.startswith(f"{setting}/async") and "summary" in v}
        out.update(compare_async(sync, asyncs))
    return out


def timeline_png(variants: dict[str, dict], path: Path) -> Path | None:
    """One Gantt chart of every variant's processes, each variant's time measured from its own start."""
    from rlhf_engine.telemetry.plots import plot_timeline

    intervals = [{**iv, "proc": f"{name}  {iv['proc']}"} for name, v in variants.items()
                 for iv in v.get("timeline", [])]
    if not intervals:
        return None
    return plot_timeline(intervals, path)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _heldout(entry: dict | None) -> str:
    """`0.958 (23/24)` from a `run_heldout` entry; FAILED when its evaluation did."""
    if not entry or "accuracy" not in entry:
        return "FAILED" if entry else "-"
    return f"{entry['accuracy']:.3f} ({len(entry['passed'])}/{entry['prompts']})"


def _whole_run_gen_idle(summary: dict) -> float:
    values = list(summary["idle_generators_whole_run"].values())
    return statistics.fmean(values) if values else float("nan")


def _variant_rows(variants: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, v in variants.items():
        s = v.get("summary")
        if s is None:
            rows.append([name, "FAILED: " + v["run"].get("error", "?")] + [""] * (len(VARIANT_HEADER) - 2))
            continue
        p = s["phases_s"]
        rows.append([name, _f(s["s_per_step"]), _f(s["samples_per_s"]), _f(s["tokens_per_s"], ".0f"),
                     _f(p["generate"]), _f(p["experience_fwd"]), _f(p["advantages"], ".3f"), _f(p["update"]),
                     _f(p["weight_sync"]), _f(p["wait_rollouts"]), _f(p["train"]), _f(s["idle_trainer"]),
                     _f(s["idle_generator"]), _f(_whole_run_gen_idle(s)), _f(s["reward_last3"], "+.3f"),
                     _f(s["kl_mean"], ".4f")])
    return rows


VARIANT_HEADER = ["variant", "s/step", "samp/s", "tok/s", "gen", "exp_fwd", "adv", "update", "wsync", "wait",
                  "T_train", "idle_trn", "idle_gen", "gen_run", "reward", "KL"]


def render(out: dict) -> str:
    wl = out["workload"]
    parts = [
        f"\nEnd-to-end PPO benchmark  {out['date']}  {out['machine']['cpu']} x{out['machine']['cpus']}  "
        f"load {out['load_average_start'][0]:.2f} -> {out['load_average_end'][0]:.2f}",
        f"model {wl['model']} ({out['model_parameters'] / 1e6:.1f} M params), batch {wl['batch_size']} "
        f"({wl['num_generations']} per prompt) x {wl['response_length']} tokens, {wl['steps']} steps "
        f"(steady state after {wl['warmup_steps']}), backend {wl['backend']}, task {wl.get('task', 'sentiment')}",
    ]
    if out["variants"]:
        parts += [
            "seconds per steady step; phases: gen = generator per batch, exp_fwd = policy/value + reference forward, "
            "adv = advantages, update = PPO epochs, wsync = weight publish, wait = trainer waiting for rollouts, "
            "T_train = step - wait; idle_gen = steady window, gen_run = whole run from the generators' own counters; "
            "reward = mean of the last 3 steps (= gold score), KL = mean over steady steps (summed over tokens)\n",
            _table(VARIANT_HEADER, _variant_rows(out["variants"])),
        ]
    for name, why in out.get("skipped", {}).items():
        parts.append(f"skipped {name}: {why}")
    if out.get("overlap"):
        rows = [[name, _f(o["t_gen"]), _f(o["t_train"]), _f(o["ideal_bound"], ".3f"), _f(o["achieved"], ".3f"),
                 _f(100 * o["fraction_of_bound"], ".1f") + "%", _f(100 * o["gain_captured"], ".0f") + "%",
                 o["bottleneck"], _f(o["bottleneck_idle"]),
                 f"{_f(o['reward_diff'], '+.3f')} ± {_f(o['reward_diff_se'], '.3f')}"]
                for name, o in out["overlap"].items()]
        parts += ["\nasync vs sync of the same setting (T_gen, T_train from the sync run)",
                  _table(["async variant", "T_gen", "T_train", "ideal", "achieved", "of ideal", "gain captured",
                          "bottleneck", "its idle", "reward - sync's"], rows)]
    if out.get("grpo"):
        heldout = "heldout_base" in out
        rows = []
        for name, v in out["grpo"].items():
            s = v.get("summary")
            if s is None:
                rows.append([name, "FAILED: " + v["run"].get("error", "?"), *[""] * (7 + heldout)])
                continue
            # ours: objective/kl sums over a sequence's tokens (response_length long when eos is ignored, so an
            # approximation otherwise); TRL's kl is per token
            kl = s["kl_last"] if name.startswith("trl") else s["kl_last"] / wl["response_length"]
            rss = s.get("peak_rss_mib", {})
            rows.append([name, _f(s["s_per_step"]), _f(s["samples_per_s"]), _f(s["tokens_per_s"], ".0f"),
                         _f(s["reward_last3"], "+.3f"), _f(kl, ".4f"), _f(rss.get("trainer"), ".0f"),
                         _f(rss.get("generator"), ".0f"), *([_heldout(v.get("heldout"))] if heldout else [])])
        parts += ["\nGRPO: ours vs TRL GRPOTrainer (transformers generation on the CPU), same model, prompts, "
                  "group, steps; peak resident set (MiB) of the trainer and of the largest generator",
                  _table(["run", "s/step", "samp/s", "tok/s", "reward", "KL/token last", "RSS trainer",
                          "RSS generator", *(["held-out acc"] if heldout else [])], rows)]
        if heldout:
            parts.append(f"held-out accuracy (greedy, {wl['eval_prompts']}) before training: "
                         f"{_heldout(out['heldout_base'])}; after {wl['steps']} steps of {wl['batch_size']} samples: "
                         "the last column")
    if out.get("padding", {}).get("layouts"):
        pad = out["padding"]
        rows = [[name, _f(r["s_per_step"]), _f(r["experience_fwd_s"]), _f(r["update_s"]),
                 _f(r["trunk_per_useful_token"]), _f(r["lm_head_per_response_token"])]
                for name, r in pad["layouts"].items()]
        spec = pad["spec"]
        parts += [f"\npadding waste: trainer step on {spec['batch_size']} responses of {spec['min_length']}.."
                  f"{spec['max_length']} tokens, {spec.get('prompt_length') or 'task'} prompt tokens, "
                  f"{spec['num_generations']} per prompt ({spec['threads']} threads)",
                  _table(["layout", "s/step", "exp_fwd", "update", "trunk pos/real token",
                          "lm_head pos/response token"], rows)]
    if out.get("scaling"):
        rows = []
        for name, v in out["scaling"].items():
            s = v.get("summary")
            if s is None:
                rows.append([name, "FAILED: " + v["run"].get("error", "?"), "", "", "", "", "", ""])
                continue
            rows.append([name, _f(s["s_per_step"]), _f(s["phases_s"]["generate"]), _f(s["phases_s"]["train"]),
                         _f(s["samples_per_s"]), _f(s["tokens_per_s"], ".0f"), str(s["steady_steps"]),
                         v.get("same_as", "")])
        parts += ["\nscaling (L = generated tokens, B = batch size)",
                  _table(["point", "s/step", "gen", "T_train", "samp/s", "tok/s", "steady steps", "measured in"], rows)]
    return "\n".join(parts)
