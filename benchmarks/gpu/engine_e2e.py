"""The async engine end to end on one device: samples/s sync against async, and weight-sync time per version.

The end-to-end benchmark's machinery (`benchmarks/bench_e2e.py`, `benchmarks/e2e/`) on a GPU: its workload
(the demo's sentiment task, a Llama built by `rlhf_engine.models.tiny`), its engine config
(`e2e.workload.run_config`), each variant in a fresh process (`e2e/run_variant.py` through
`bench_e2e._child`) and its numbers (`e2e.analysis.summarize`, `compare_async`, the timeline chart). What this
script adds: the trainer and the generator on `--device` (one GPU for both processes), the transformers
generator (the GPU image has no vLLM) in `--generator-dtype`, the unpinned setting (every process may use every
core), and the weight sync of each version:
  publish_s        the trainer's seconds publishing a version (`time/engine/weight_sync`), the steady
                   steps' mean; every step's in publish_s_all
  apply_s          a generator's seconds applying a version (its `LoopStats.update_s / updates_applied`)
  bytes            the policy's weights as the trainer holds them (fp32), and bytes / publish_s
Variants: `unpinned/sync` and `unpinned/async-s1` (`--variants`). The JSON (`--out`) is rewritten after each
variant; a failed variant is recorded with the last lines of its log and of its generators' logs.

    python benchmarks/gpu/engine_e2e.py --device cuda --out engine_e2e.json
    python benchmarks/gpu/engine_e2e.py --device cpu --quick --out /tmp/engine_e2e.json   # the dry run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))  # bench_e2e and its helpers in benchmarks/e2e

import bench_e2e  # noqa: E402
from e2e import analysis, report  # noqa: E402
from e2e.workload import (  # noqa: E402
    BENCH_MODEL,
    QUICK_MODEL,
    Workload,
    available_cpus,
    build_model,
    parse_variant,
    run_config,
    write_prompts,
)
from provenance import package_versions  # noqa: E402


def device_config(config: dict, device: str, generator_dtype: str) -> dict:
    """`run_config`'s tree with the trainer and the generator on `device`, the generator in `generator_dtype`."""
    config["generator"].update(device=device, dtype=generator_dtype)
    config["trainer"] = {**config.get("trainer", {}), "device": device}
    return config


def weight_sync(result: dict, summary: dict, warmup: int, weight_bytes: int) -> dict:
    """Seconds per published version on the trainer (the mean over the steady steps; every step's in
    `publish_s_all`) and per applied version on each generator."""
    publish = [r.get("time/engine/weight_sync", float("nan")) for r in result["rows"]]  # one version per step
    steady = publish[warmup:]
    publish_s = sum(steady) / len(steady) if steady else float("nan")
    apply_s = {name: s["update_s"] / s["updates_applied"] for name, s in result["loop_stats"].items()
               if s.get("updates_applied")}
    return {"versions_published": len(result["rows"]), "publish_s": publish_s, "publish_s_all": publish,
            "apply_s": apply_s, "bytes": weight_bytes,
            "publish_gb_per_s": weight_bytes / publish_s / 1e9 if publish_s > 0 else float("nan"),
            "s_per_step": summary["s_per_step"]}


def log_tails(run_dir: Path, lines: int = 25) -> dict[str, list[str]]:
    """The last lines of every process log of a run (the generators' and the engine's)."""
    return {log.name: log.read_text(errors="replace").splitlines()[-lines:] for log in sorted(run_dir.glob("*.log"))}


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **package_versions(("transformers", "pyzmq", "msgspec"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="the toy model, batch 8, 8 tokens, 3 steps")
    p.add_argument("--variants", default="unpinned/sync,unpinned/async-s1")
    p.add_argument("--steps", type=int, help="PPO steps per variant (default 6; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the steady-state numbers")
    p.add_argument("--batch-size", type=int, help="samples per step (default 32; quick 8)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--response-length", type=int, help="generated tokens per sample (default 64; quick 8)")
    p.add_argument("--generator-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="seconds for the whole script: each variant gets what is left / variants left")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/rlhf_gpu_engine_e2e"),
                   help="model, prompts, run directories and logs (emptied first)")
    p.add_argument("--timeline", type=Path, default=None, help="a PNG of the variants' busy intervals")
    p.add_argument("--out", type=Path, required=True, help="the JSON, rewritten after every variant")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 6)
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.response_length = args.response_length or (8 if args.quick else 64)
    args.variant_list = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.time()
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = QUICK_MODEL if args.quick else BENCH_MODEL
    model = build_model(work / "model", shape)
    workload = Workload(model=str(model), prompts=str(write_prompts(work / "prompts.jsonl")),
                        batch_size=args.batch_size, num_generations=args.num_generations,
                        response_length=args.response_length, steps=args.steps, warmup_steps=args.warmup,
                        backend="transformers")
    params = report.count_parameters(workload.model)
    out = {"benchmark": "engine_e2e", "device": args.device, "versions": versions(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "workload": asdict(workload), "model_shape": asdict(shape),
           "model_parameters": params, "generator_dtype": args.generator_dtype, "variants": {}, "errors": {}}
    cpus = available_cpus()
    for i, variant in enumerate(args.variant_list):
        left = args.budget_s - (time.time() - t_begin)
        timeout = left / (len(args.variant_list) - i)
        if timeout < 5:
            out["errors"][variant.name] = f"skipped: {left:.0f} s of --budget-s left"
            continue
        run_dir = work / "runs" / variant.name.replace("/", "_")
        config = device_config(run_config(workload, variant, run_dir, cpus), args.device, args.generator_dtype)
        print(f"-- {variant.name}: {workload.steps} steps of {workload.batch_size} x {workload.response_length} "
              f"tokens on {args.device} (at most {timeout:.0f} s)", flush=True)
        result, info = bench_e2e._child("run_variant.py", {"config": config, "steps": workload.steps},
                                        variant.name, work, timeout)
        entry = {"variant": asdict(variant), "run": info}
        if result is None:
            out["errors"][variant.name] = info.get("error", "failed")
            entry["process_logs"] = log_tails(run_dir)
        else:
            s = analysis.summarize(result, warmup=workload.warmup_steps, batch_size=workload.batch_size)
            entry.update(summary=s, weight_sync=weight_sync(result, s, workload.warmup_steps, params * 4),
                         startup_s=result["t_start"] - result["t_launch"], loop_stats=result["loop_stats"],
                         timeline=[{**iv, "start": iv["start"] - result["t_start"],
                                    "end": iv["end"] - result["t_start"]}
                                   for iv in result["timeline"] if iv["end"] >= result["t_start"]])
            ws = entry["weight_sync"]
            print(f"   {s['samples_per_s']:.2f} samples/s, {s['s_per_step']:.2f} s/step, publish "
                  f"{ws['publish_s'] * 1e3:.1f} ms/version, apply {ws['apply_s']} s, startup "
                  f"{entry['startup_s']:.0f} s", flush=True)
        out["variants"][variant.name] = entry
        out["async_vs_sync"] = report.overlap_table(out["variants"])
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.timeline is not None:
        png = report.timeline_png(out["variants"], args.timeline)
        out["timeline_png"] = str(png) if png else None
    out["total_s"] = time.time() - t_begin
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, c in out.get("async_vs_sync", {}).items():
        print(f"{name}: {c['achieved']:.2f}x sync's samples/s (ideal bound {c['ideal_bound']:.2f}x)")
    print(f"wrote {args.out} in {out['total_s']:.0f} s")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
