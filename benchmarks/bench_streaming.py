"""Long-tailed generation: the batch pipeline (sync, async-s1) against continuous generation with in-flight
weight updates and streamed steps.

Every variant trains the same model on the same prompts for the same steps, each in its own process
(`benchmarks/e2e/run_variant.py`). Each prompt carries its own response budget (`data.max_new_tokens_field`),
drawn once from a log-normal distribution (median `--median`, sigma `--sigma`, at most `--max-length`
tokens) and sampled with EOS ignored, so every variant generates exactly the same tokens per prompt:

  sync             unpinned/sync: each batch sampled by the newest policy, every core to each phase
  async-s1         pinned/async-s1: today's pipeline, one batch generating while one trains
  keep-s1          + continuous generation (`generator.max_inflight`), new weights between decode steps
  recompute-s1     + continuous generation, running sequences re-prefilled under new weights
  keep-s2-stream   keep, `max_staleness` 2, streamed steps (`engine.streaming`): the first finished groups
  uniform/...      `--uniform`: the same variants on fixed-length responses (no regression check)

Printed and written to benchmarks/results/streaming_<tag>.json (machine, versions, date, load average):
samples/s and tokens/s in the steady window, trainer and generator idle fractions, token ages, trained
against sampled response length, reward; a Gantt chart to benchmarks/results/streaming_<tag>_timeline.png.

    python benchmarks/bench_streaming.py                  # ~15 min on 2 cores
    python benchmarks/bench_streaming.py --quick          # a tiny model, short tails: a smoke run
    python benchmarks/bench_streaming.py --variants sync,keep-s2-stream --steps 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_engine.engine.config import EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers in benchmarks/e2e (also under runpy)

from bench_e2e import _child  # noqa: E402
from e2e import analysis, report  # noqa: E402
from e2e.workload import (  # noqa: E402
    BENCH_MODEL,
    QUICK_MODEL,
    ModelShape,
    Variant,
    Workload,
    available_cpus,
    build_model,
    run_config,
    write_prompts,
)
from provenance import Provenance  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUDGET_FIELD = "budget"
SHAPES = {
    "bench": BENCH_MODEL,  # the e2e benchmark's 38 M Llama: on 2 CPU cores its PPO step outweighs generation
    # ~5 M parameters: vLLM's per-step cost dominates generation, as decoding does on a GPU with a large model,
    # while the trainer's step stays cheap: the generation-bound regime the pipeline is for
    "small": ModelShape(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "quick": QUICK_MODEL,
}


@dataclass(frozen=True)
class Pipeline:
    """One variant: the e2e benchmark's `Variant` plus continuous generation and streaming."""

    name: str
    base: Variant
    max_inflight: int = 0
    inflight_update: str = "off"
    streaming: bool = False


DEFAULT_PIPELINES = ("sync", "async-s1", "keep-s1", "recompute-s1", "keep-s4-stream", "recompute-s4-stream")


def pipeline(name: str, batch_size: int, setting: str = "pinned") -> Pipeline:
    """`sync`, `async-sN` (the batch pipeline), `keep-sN` / `recompute-sN` (continuous generation with that
    in-flight update, room for 2 batches of sequences, or for max_staleness batches when streamed), `...-stream`
    (streamed steps)."""
    parts = name.split("-")
    if name == "sync":
        return Pipeline(name, Variant(mode="sync", setting="unpinned", estimator="grpo"))
    if len(parts) not in (2, 3) or parts[1][:1] != "s" or not parts[1][1:].isdigit() or (
            parts[0] not in ("async", "keep", "recompute")) or parts[2:] not in ([], ["stream"]) or (
            parts[0] == "async" and len(parts) == 3):
        raise ValueError(f"variant {name!r}: expected sync, async-sN, keep-sN[-stream] or recompute-sN[-stream]")
    staleness, streaming = int(parts[1][1:]), len(parts) == 3
    if streaming:  # the engine's own rule for the staleness of streamed steps, before any variant runs
        try:
            EngineConfig(mode="async", max_staleness=staleness, streaming=True)
        except ValueError as e:
            raise ValueError(f"variant {name!r}: expected sync, async-sN, keep-sN[-stream] or "
                             f"recompute-sN[-stream]: {e}") from e
    base = Variant(mode="async", max_staleness=staleness, setting=setting, estimator="grpo")
    if parts[0] == "async":
        return Pipeline(name, base)
    batches = staleness if streaming else 2  # what is handed out ahead (`EngineConfig.batches_in_flight`)
    return Pipeline(name, base, batches * batch_size, parts[0], streaming)


def budgets(n: int, median: int, sigma: float, max_length: int, seed: int) -> list[int]:
    """`n` response budgets, log-normal around `median`, in [1, max_length], fixed by `seed`."""
    import torch

    z = torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [max(1, min(max_length, round(median * math.exp(sigma * x)))) for x in z]


def write_budget_prompts(path: Path, lengths: list[int]) -> Path:
    """The e2e prompts, each with its budget."""
    prompts = write_prompts(path.with_suffix(".plain.jsonl"), n=len(lengths))
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, BUDGET_FIELD: b}) + "\n" for r, b in zip(records, lengths)))
    return path


def config(workload: Workload, p: Pipeline, run_dir: Path, cpus: list[int]) -> dict:
    """The run config tree of `p`: the e2e benchmark's, with per-prompt budgets and the pipeline's settings."""
    tree = run_config(workload, p.base, run_dir, cpus)
    tree["data"]["max_new_tokens_field"] = BUDGET_FIELD
    tree["generator"].update(max_inflight=p.max_inflight, inflight_update=p.inflight_update)
    tree["engine"]["streaming"] = p.streaming
    return tree


def run_pipeline(workload: Workload, p: Pipeline, work: Path, cpus: list[int], timeout: float, label: str) -> dict:
    run_dir = work / "runs" / label.replace("/", "_")
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    spec = {"config": config(workload, p, run_dir, cpus), "steps": workload.steps}
    print(f"-- {label}: {workload.steps} steps of {workload.batch_size} samples", flush=True)
    result, info = _child("run_variant.py", spec, label, work, timeout)
    entry = {"pipeline": {**asdict(p), "base": asdict(p.base)}, "run": info}
    if result is None:
        return entry
    s = analysis.summarize(result, warmup=workload.warmup_steps, batch_size=workload.batch_size)
    steady = result["rows"][workload.warmup_steps:]
    ages = [r["async/token_age_max"] for r in steady]
    s.update(token_age_max=max(ages), multi_version_samples=_mean([r["async/multi_version_samples"] for r in steady]),
             trained_length_mean=result["rows"][-1]["async/response_length/trained_mean"],
             sampled_length_mean=result["rows"][-1]["async/response_length/sampled_mean"],
             reward_per_sample=_mean([r["env/reward_mean"] for r in result["rows"]]))
    entry.update(summary=s, loop_stats=result["loop_stats"],
                 timeline=[{**iv, "start": iv["start"] - result["t_start"], "end": iv["end"] - result["t_start"]}
                           for iv in result["timeline"] if iv["end"] >= result["t_start"]])
    print(f"   {s['samples_per_s']:.2f} samples/s, idle trainer {s['idle_trainer']:.2f} generator "
          f"{s['idle_generator']:.2f}, token age <= {s['token_age_max']:.0f}, lengths trained "
          f"{s['trained_length_mean']:.1f} sampled {s['sampled_length_mean']:.1f}", flush=True)
    return entry


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def render(out: dict) -> str:
    lines = []
    for workload_name, variants in out["workloads"].items():
        base = variants.get("sync", {}).get("summary", {}).get("samples_per_s")
        s1 = variants.get("async-s1", {}).get("summary", {}).get("samples_per_s")
        rows = []
        for name, v in variants.items():
            s = v.get("summary")
            if s is None:
                rows.append([name] + ["failed"] + ["-"] * 8)
                continue
            rows.append([name, report._f(s["samples_per_s"]), report._f(s["tokens_per_s"], ".0f"),
                         report._f(s["samples_per_s"] / base if base else None),
                         report._f(s["samples_per_s"] / s1 if s1 else None),
                         report._f(s["idle_trainer"]), report._f(s["idle_generator"]),
                         report._f(s["token_age_max"], ".0f"), report._f(s["multi_version_samples"]),
                         f"{s['trained_length_mean']:.1f}/{s['sampled_length_mean']:.1f}",
                         report._f(s["reward_per_sample"])])
        lines += [f"\n{workload_name}:", report._table(
            ["variant", "samples/s", "tok/s", "x sync", "x async-s1", "idle tr", "idle gen", "age max",
             "multi-ver", "len trained/sampled", "reward"], rows)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and short tails: a smoke run")
    p.add_argument("--variants", help="comma-separated names (default: all)")
    p.add_argument("--setting", choices=("pinned", "unpinned"), default="pinned",
                   help="async variants: generator and trainer on a core each (pinned) or both on every core")
    p.add_argument("--shape", choices=sorted(SHAPES), help="the model built (default small; quick: quick)")
    p.add_argument("--steps", type=int, help="PPO steps per variant (default 8; quick 3)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the steady-state numbers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--median", type=int, help="median response budget (default 32; quick 8)")
    p.add_argument("--sigma", type=float, default=1.2, help="log-normal sigma of the budgets")
    p.add_argument("--max-length", type=int, help="longest response (default 512; quick 64)")
    p.add_argument("--uniform", action=argparse.BooleanOptionalAction, default=True,
                   help="also every variant on uniform budgets of the median (no-regression check)")
    p.add_argument("--tag", help="results file name: streaming_<tag>.json (default cpu; quick: quick)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/rlhf_bench_streaming"))
    p.add_argument("--variant-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 8)
    args.median = args.median or (8 if args.quick else 32)
    args.max_length = args.max_length or (64 if args.quick else 512)
    args.tag = args.tag or ("quick" if args.quick else "cpu")
    args.shape = args.shape or ("quick" if args.quick else "small")
    if args.quick:
        args.warmup = min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cpus = available_cpus()
    shape = SHAPES[args.shape]
    model = build_model(work / f"model_{args.shape}_{shape.hidden_size}_{shape.num_layers}", shape)
    n_prompts = 256
    tailed = budgets(n_prompts, args.median, args.sigma, args.max_length, seed=0)
    sets = {"long-tailed": write_budget_prompts(work / "prompts_tailed.jsonl", tailed)}
    if args.uniform:
        sets["uniform"] = write_budget_prompts(work / "prompts_uniform.jsonl", [args.median] * n_prompts)
    try:
        chosen = {v: pipeline(v, args.batch_size, args.setting) for v in (args.variants.split(",") if args.variants
                                                             else DEFAULT_PIPELINES)}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    run = Provenance.start("streaming")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "budgets": {"median": sorted(tailed)[len(tailed) // 2], "mean": _mean(tailed), "max": max(tailed),
                       "p90": sorted(tailed)[int(0.9 * len(tailed))]},
           "workloads": {}}
    t0 = time.time()
    for set_name, prompts in sets.items():
        workload = Workload(model=str(model), prompts=str(prompts), batch_size=args.batch_size,
                            num_generations=args.num_generations, response_length=args.max_length if set_name ==
                            "long-tailed" else args.median, steps=args.steps, warmup_steps=args.warmup,
                            kv_cache_bytes=1 << 28)
        variants = out["workloads"].setdefault(set_name, {})
        for name, p in chosen.items():
            variants[name] = run_pipeline(workload, p, work, cpus, args.variant_timeout, f"{set_name}/{name}")
    out["wall_s"] = time.time() - t0
    print(render(out))
    run.write(args.out_dir / f"streaming_{args.tag}.json", out)
    png = report.timeline_png({f"{w}/{n}": v for w, vs in out["workloads"].items() for n, v in vs.items()
                               if w == "long-tailed"}, args.out_dir / f"streaming_{args.tag}_timeline.png")
    if png:
        print(f"wrote {png}")
    return out


if __name__ == "__main__":
    main()
