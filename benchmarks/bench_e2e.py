"""End-to-end PPO throughput of rlhf_engine: sync vs async, pinned vs unpinned, against TRL GRPO.

Every variant runs the same model, prompts, generation length and number of steps, one after
another in its own process (`benchmarks/e2e/run_variant.py`):

  SETTING/MODE[-sN][-gN][-grpo]   e.g. pinned/sync, pinned/async-s1, unpinned/async-s2-g2
  pinned     the generator on one core, the trainer on another, one thread each: isolates the overlap
  unpinned   no pinning, each process uses every core: the best a user can do for sync
  sync       the generator waits for each new policy; async-sN: at most N versions of staleness
  -gN        N generator processes;  -grpo: the critic-free GRPO estimator instead of GAE

Printed and written to benchmarks/results/e2e_<tag>.json (machine, versions, date, load average):
samples/s and generated tokens/s (steady state, after `--warmup` steps), seconds per phase,
idle fractions of trainer and generator, reward (= the task's gold score) and KL, the ideal
overlap bound (T_gen + T_train) / max(T_gen, T_train) beside the achieved async/sync speed-up;
TRL 1.16 `GRPOTrainer` (transformers generation on the CPU) beside our grpo estimator; time per
step against generation length and batch size. A Gantt chart of the busy intervals goes to
benchmarks/results/e2e_<tag>_timeline.png.

    python benchmarks/bench_e2e.py                       # the full run (~15 min on 2 cores)
    python benchmarks/bench_e2e.py --quick               # a tiny model, a minute or two
    python benchmarks/bench_e2e.py --variants pinned/sync,pinned/async-s1 --no-trl --no-scaling
    python benchmarks/bench_e2e.py --model /path/to/hf_folder --response-length 128
    python benchmarks/bench_e2e.py --task arithmetic       # accuracy: SmolLM2, ours vs TRL (~16 min)

`--task arithmetic` (held-out accuracy after the same samples): the SmolLM2 recipe's chat prompts, rewards and
held-out sums (examples/smollm2_arithmetic) on the real model (`make real-model`; or --model), completions
ending at end of turn; our grpo runs (sync and async-s1) and TRL's each save their policy after `--steps`,
and one evaluator (benchmarks/e2e/heldout.py: greedy, vLLM, strict `#### N` accuracy) scores the base model
and every trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers in benchmarks/e2e (also under runpy)

from e2e import analysis, report  # noqa: E402
from e2e.workload import (  # noqa: E402
    BENCH_MODEL,
    QUICK_MODEL,
    TASKS,
    Variant,
    Workload,
    arithmetic_task,
    available_cpus,
    build_model,
    parse_variant,
    run_config,
    write_prompts,
)
from provenance import Provenance, save  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_VARIANTS = ("pinned/sync", "pinned/async-s1", "pinned/async-s2", "pinned/async-s1-g2",
                    "unpinned/sync", "unpinned/async-s1", "unpinned/async-s2", "unpinned/async-s1-g2")
QUICK_VARIANTS = ("pinned/sync", "pinned/async-s1")
REAL_MODEL = HERE.parent / ".cache" / "real-model" / "SmolLM2-135M-Instruct"
"""Where `make real-model` writes SmolLM2-135M-Instruct: the arithmetic task's default model."""
ARITHMETIC_DEFAULTS = {"steps": 12, "batch_size": 32, "num_generations": 8, "learning_rate": 1e-5, "kl_coef": 0.0,
                       "variants": "none", "grpo_variants": "unpinned/sync-grpo,pinned/async-s1-grpo",
                       "scaling": False, "padding": False, "tag": "arithmetic_cpu", "kv_cache_mib": 512}
"""`--task arithmetic`: 12 steps of 4 prompts x 8 (384 samples), the recipe's GRPO without a KL penalty (one
optimizer step per batch at twice the recipe's learning rate, which takes two of half the batch), our grpo
runs and TRL's only."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local HF causal-LM folder (default: build the ~38 M-parameter Llama; "
                   "--task arithmetic: SmolLM2-135M-Instruct from `make real-model`)")
    p.add_argument("--task", choices=TASKS, default="sentiment",
                   help="sentiment: fixed-length completions, for throughput; arithmetic: SmolLM2's recipe, "
                        "held-out accuracy of each trained policy (see below)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batch 8, 8 tokens, 3 steps, pinned sync and async-s1 only, no TRL/scaling")
    p.add_argument("--variants", help=f"comma-separated variant names, or none (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", type=int, help="PPO steps per variant (default 6; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of steady-state numbers")
    p.add_argument("--batch-size", type=int, help="samples per step (default 16; quick 8)")
    p.add_argument("--num-generations", type=int, help="completions per prompt (GRPO group size; default 4, "
                   "arithmetic 8)")
    p.add_argument("--response-length", type=int, help="generated tokens per completion (default 32; quick 8)")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, help="both sides (default 1e-4; arithmetic 1e-5)")
    p.add_argument("--kl-coef", type=float, help="fixed KL coefficient, TRL's beta (default 0.05; arithmetic 0)")
    p.add_argument("--backend", choices=("vllm", "transformers"), default="vllm", help="our generator backend")
    p.add_argument("--bf16", action="store_true",
                   help="both sides in bf16: our trainer's passes (ppo.bf16) and vLLM (generator.dtype), TRL's bf16 "
                        "(its autocast covers training and generation)")
    p.add_argument("--logprobs-from-hidden", action="store_true", help="our ppo.logprobs_from_hidden")
    p.add_argument("--kv-cache-mib", type=int, help="vLLM KV cache of our generator (default 256; arithmetic 512)")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=None,
                   help="TRL GRPOTrainer beside our grpo estimator (default on; off with --quick)")
    p.add_argument("--trl-steps", type=int, help="steps of the TRL comparison (default: --steps)")
    p.add_argument("--trl-micro-batch", type=int,
                   help="TRL's per_device_train_batch_size, the rest of the batch by gradient accumulation (still one "
                        "generation batch and one optimizer step per step; default: the whole batch at once, as ours)")
    p.add_argument("--grpo-variants",
                   help="our runs of the grpo estimator (beside TRL's with --trl): variants with -grpo, none, or best "
                        "(with --trl only: the setting and mode of the fastest variant measured above, with -grpo; "
                        "the default; arithmetic: "
                        f"{ARITHMETIC_DEFAULTS['grpo_variants']})")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="time per step vs generation length and batch size (default on; off with --quick)")
    p.add_argument("--scaling-variant", default="unpinned/sync")
    p.add_argument("--scaling-lengths", default="32,128,512")
    p.add_argument("--scaling-batches", default="4,16,32", help="batch sizes at the first scaling length "
                   "(a point that a variant above already measured is taken from it)")
    p.add_argument("--scaling-batch-size", type=int, default=4, help="batch size of the length sweep")
    p.add_argument("--scaling-steps", type=int, default=2)
    p.add_argument("--padding", action=argparse.BooleanOptionalAction, default=None,
                   help="padding waste of the trainer, padded vs packed, on variable-length responses "
                        "(default on; off with --quick)")
    p.add_argument("--padding-lengths", default="8,128", help="min,max response length of the padding run")
    p.add_argument("--padding-prompt-length", type=int, default=0,
                   help="prompt tokens of the padding run (0: the task's prompts; N: random prompts of N tokens)")
    p.add_argument("--padding-steps", type=int, default=3, help="trainer steps per layout (the first is warm-up)")
    p.add_argument("--tag", help="results file name: e2e_<tag>.json (default cpu; quick: quick; arithmetic: "
                   "arithmetic_cpu)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/rlhf_bench_e2e"),
                   help="models, prompts, run directories and logs")
    p.add_argument("--variant-timeout", type=float, default=900.0, help="seconds before a variant is killed")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no further run once this many seconds have passed (the rest is listed as skipped)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.task == "arithmetic":
        if quick:
            p.error("--quick runs the sentiment task on a tiny model; --task arithmetic needs a real instruct model")
        for name, value in ARITHMETIC_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.steps = args.steps or (3 if quick else 6)
    args.batch_size = args.batch_size or (8 if quick else 16)
    args.num_generations = args.num_generations or 4
    args.response_length = args.response_length or (8 if quick else 32)
    args.learning_rate = 1e-4 if args.learning_rate is None else args.learning_rate
    args.kl_coef = 0.05 if args.kl_coef is None else args.kl_coef
    args.kv_cache_mib = args.kv_cache_mib or 256
    args.grpo_variants = args.grpo_variants or "best"
    args.trl = (not quick) if args.trl is None else args.trl
    args.scaling = (not quick) if args.scaling is None else args.scaling
    args.padding = (not quick) if args.padding is None else args.padding
    args.tag = args.tag or ("quick" if quick else "cpu")
    names = args.variants.split(",") if args.variants else (QUICK_VARIANTS if quick else DEFAULT_VARIANTS)
    args.variant_list = [parse_variant(n.strip()) for n in names if n.strip() and n.strip() != "none"]
    grpo = [n.strip() for n in args.grpo_variants.split(",") if n.strip() and n.strip() not in ("best", "none")]
    args.grpo_list = [parse_variant(n) for n in grpo]
    args.grpo_best = "best" in args.grpo_variants.split(",")
    if any(v.estimator != "grpo" for v in args.grpo_list):
        p.error(f"--grpo-variants must all end in -grpo (or be best), got {args.grpo_variants!r}")
    return args


# ------------------------------------------------------------------------------------------------
# running things in child processes
# ------------------------------------------------------------------------------------------------
def _child(script: str, spec: dict, name: str, work: Path, timeout: float,
           python_path: str | None = None) -> tuple[dict | None, dict]:
    """Run `benchmarks/e2e/<script>` on `spec` in a fresh process (`python_path` first on its PYTHONPATH, and its
    children's); returns (result or None, run info)."""
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, env.get("PYTHONPATH")) if p)
    slug = name.replace("/", "_")
    spec_path, out_path, log_path = work / f"{slug}.spec.json", work / f"{slug}.result.json", work / f"{slug}.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    info = {"load_before": os.getloadavg()}
    t0 = time.time()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "e2e" / script), str(spec_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            info["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            info["returncode"] = None
            info["error"] = f"killed after {timeout:.0f} s (--variant-timeout)"
    info.update(wall_s=time.time() - t0, load_after=os.getloadavg(), log=str(log_path))
    if info["returncode"] == 0 and out_path.is_file():
        return json.loads(out_path.read_text()), info
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    info.setdefault("error", f"exit code {info['returncode']}")
    info["log_tail"] = tail
    print(f"  !! {name} failed ({info['error']}); last lines of {log_path}:\n     " + "\n     ".join(tail))
    return None, info


def run_engine_variant(workload: Workload, variant: Variant, work: Path, cpus: list[int], timeout: float,
                       label: str | None = None) -> dict:
    label = label or variant.name
    run_dir = work / "runs" / label.replace("/", "_")
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    spec = {"config": run_config(workload, variant, run_dir, cpus), "steps": workload.steps,
            "save_policy": workload.eval_prompts is not None}
    print(f"-- {label}: {workload.steps} steps of {workload.batch_size} x {workload.response_length} tokens",
          flush=True)
    result, info = _child("run_variant.py", spec, label, work, timeout, workload.python_path)
    entry = {"variant": asdict(variant), "workload": asdict(workload), "run": info}
    if result is not None:
        entry["summary"] = analysis.summarize(result, warmup=workload.warmup_steps, batch_size=workload.batch_size,
                                              num_generators=variant.num_generators)
        entry["timeline"] = [{**iv, "start": iv["start"] - result["t_start"], "end": iv["end"] - result["t_start"]}
                             for iv in result["timeline"] if iv["end"] >= result["t_start"]]
        entry["startup_s"] = result["t_start"] - result["t_launch"]
        entry["loop_stats"] = result["loop_stats"]
        entry["cpu_plan"] = result["cpu_plan"]
        s = entry["summary"]
        print(f"   {s['s_per_step']:.2f} s/step, {s['samples_per_s']:.2f} samples/s, idle trainer "
              f"{s['idle_trainer']:.2f} generator {s['idle_generator']:.2f} (startup {entry['startup_s']:.0f} s, "
              f"load {info['load_after'][0]:.2f})", flush=True)
        if result["policy"]:
            entry["heldout"] = run_heldout(workload, result["policy"], label, work, timeout)
    return entry


def run_trl(workload: Workload, steps: int, threads: int, work: Path, timeout: float, micro_batch: int) -> dict:
    if workload.batch_size % micro_batch:
        raise SystemExit(f"--trl-micro-batch ({micro_batch}) must divide the batch size ({workload.batch_size})")
    spec = {"model": workload.model, "prompts": workload.prompts, "batch_size": workload.batch_size,
            "micro_batch": micro_batch,
            "num_generations": workload.num_generations, "response_length": workload.response_length,
            "steps": steps, "learning_rate": workload.learning_rate, "kl_coef": workload.kl_coef,
            "temperature": workload.temperature, "ignore_eos": workload.ignore_eos, "reward_fn": workload.reward_fn,
            "bf16": workload.bf16, "threads": threads, "out_dir": str(work / "runs" / "trl"),
            "save_policy": workload.eval_prompts is not None}
    print(f"-- trl/grpo: {steps} steps of {workload.batch_size} x {workload.response_length} tokens", flush=True)
    result, info = _child("trl_grpo.py", spec, "trl_grpo", work, timeout, workload.python_path)
    entry = {"spec": spec, "run": info}
    if result is not None:
        entry["summary"] = report.trl_summary(result, warmup=workload.warmup_steps, batch_size=workload.batch_size)
        entry["trl_version"] = result["trl_version"]
        entry["startup_s"] = result["t_start"] - result["t_launch"]
        print(f"   {entry['summary']['s_per_step']:.2f} s/step, {entry['summary']['samples_per_s']:.2f} samples/s",
              flush=True)
        if result["policy"]:
            entry["heldout"] = run_heldout(workload, result["policy"], "trl/grpo", work, timeout)
    return entry


def run_heldout(workload: Workload, policy: str, label: str, work: Path, timeout: float) -> dict:
    """Held-out accuracy of the policy folder `policy` (benchmarks/e2e/heldout.py), for the run `label`."""
    spec = {"model": policy, "prompts": workload.eval_prompts, "reward_fn": workload.reward_fn,
            "gold_fn": workload.gold_fn, "max_prompt_length": workload.max_prompt_length,
            "max_new_tokens": workload.response_length, "max_model_len": workload.max_model_len,
            "dtype": "bfloat16" if workload.bf16 else "float32", "kv_cache_bytes": workload.kv_cache_bytes}
    result, info = _child("heldout.py", spec, f"heldout_{label}", work, timeout, workload.python_path)
    if result is None:
        return {"spec": spec, "run": info}
    print(f"   held-out accuracy of {label}: {result['accuracy']:.3f} ({len(result['passed'])} of "
          f"{result['prompts']}), mean length {result['mean_length']:.1f}", flush=True)
    return {"spec": spec, "run": info, **result}


def run_padding(workload: Workload, args: argparse.Namespace, threads: int, work: Path) -> dict:
    low, high = (int(x) for x in args.padding_lengths.split(","))
    spec = {"model": workload.model, "batch_size": workload.batch_size, "num_generations": workload.num_generations,
            "min_length": low, "max_length": high, "steps": args.padding_steps, "threads": threads,
            "estimator": "grpo", "prompt_length": args.padding_prompt_length}
    print(f"-- padding: {workload.batch_size} responses of {low}..{high} tokens, padded vs packed vs shared prompts",
          flush=True)
    result, info = _child("padding.py", spec, "padding", work, args.variant_timeout)
    entry = {"spec": spec, "run": info}
    if result is not None:
        entry.update(result)
        for name, r in result["layouts"].items():
            print(f"   {name}: {r['s_per_step']:.2f} s/step, {r['trunk_per_useful_token']:.2f} trunk positions "
                  f"per real token, {r['lm_head_per_response_token']:.2f} LM-head positions per response token",
                  flush=True)
    return entry


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> Workload:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.model or args.task == "arithmetic":
        model = Path(args.model or REAL_MODEL).resolve()
        if not (model / "config.json").is_file():
            raise SystemExit(f"--model {model}: no config.json there; give a local HF causal-LM folder "
                             "(SmolLM2-135M-Instruct: `make real-model`)")
    else:
        shape = QUICK_MODEL if args.quick else BENCH_MODEL
        name = (f"model_v{shape.vocab_size}_h{shape.hidden_size}_l{shape.num_layers}_i{shape.intermediate_size}"
                f"_p{shape.max_position_embeddings}")
        model = build_model(work / name, shape)
    task = (arithmetic_task(work / "arithmetic") if args.task == "arithmetic"
            else {"prompts": str(write_prompts(work / "prompts.jsonl"))})
    return Workload(model=str(model), **task, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    kl_coef=args.kl_coef,
                    num_generations=args.num_generations, response_length=args.response_length, steps=args.steps,
                    warmup_steps=args.warmup, ppo_epochs=args.ppo_epochs, backend=args.backend,
                    kv_cache_bytes=args.kv_cache_mib << 20, bf16=args.bf16,
                    logprobs_from_hidden=args.logprobs_from_hidden)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = Provenance.start("e2e")
    t_begin = time.time()
    cpus = available_cpus()
    workload = prepare(args)
    work = args.work_dir
    out = {"workload": asdict(workload), "model_parameters": report.count_parameters(workload.model),
           "variants": {}, "skipped": {}}

    def over_budget(name: str) -> bool:
        if args.budget_s is None or time.time() - t_begin < args.budget_s:
            return False
        out["skipped"][name] = f"--budget-s {args.budget_s:.0f} spent before it started"
        print(f"-- {name}: skipped ({out['skipped'][name]})")
        return True

    if workload.eval_prompts is not None:
        print("-- held-out accuracy of the model before training", flush=True)
        out["heldout_base"] = run_heldout(workload, workload.model, "base", work, args.variant_timeout)

    # 1. sync vs async, pinned and unpinned
    for variant in args.variant_list:
        if not variant.fits(len(cpus)):
            out["skipped"][variant.name] = (f"{variant.num_generators} pinned generators + a trainer need "
                                            f"{variant.num_generators + 1} cores; this machine has {len(cpus)}")
            print(f"-- {variant.name}: skipped ({out['skipped'][variant.name]})")
            continue
        if not over_budget(variant.name):
            out["variants"][variant.name] = run_engine_variant(workload, variant, work, cpus, args.variant_timeout)
    out["overlap"] = report.overlap_table(out["variants"])

    # 2. our grpo estimator (the variants named; best: only beside TRL), and TRL GRPO beside it
    trl_steps = args.trl_steps or args.steps
    wl = replace(workload, steps=trl_steps)
    grpo_list = list(args.grpo_list)
    measured = {name: v["summary"]["samples_per_s"] for name, v in out["variants"].items() if "summary" in v}
    if args.trl and args.grpo_best and measured:
        best = replace(parse_variant(max(measured, key=measured.get)), estimator="grpo")
        grpo_list += [best] if best not in grpo_list else []
    if grpo_list or args.trl:
        out["grpo"] = {v.name: run_engine_variant(wl, v, work, cpus, args.variant_timeout)
                       for v in grpo_list if not over_budget(v.name)}
    if args.trl and not over_budget("trl/grpo"):
        out["grpo"]["trl/grpo"] = run_trl(wl, trl_steps, len(cpus), work, args.variant_timeout,
                                          args.trl_micro_batch or wl.batch_size)

    # 3. padding waste of the trainer on variable-length responses, padded vs packed
    if args.padding and not over_budget("padding"):
        out["padding"] = run_padding(workload, args, len(cpus), work)

    # 4. time per step vs generation length and batch size
    if args.scaling:
        variant = parse_variant(args.scaling_variant)
        lengths = [int(x) for x in args.scaling_lengths.split(",")]
        batches = [int(x) for x in args.scaling_batches.split(",")]
        points = [(lengths[0], args.scaling_batch_size)]
        points += [(lengths[0], b) for b in batches if b != args.scaling_batch_size]
        points += [(length, args.scaling_batch_size) for length in lengths[1:]]  # the longest generation last
        out["scaling"] = {}
        for length, batch in points:
            wl = replace(workload, response_length=length, batch_size=batch, steps=args.scaling_steps,
                         warmup_steps=min(workload.warmup_steps, args.scaling_steps - 1))
            label = f"scaling/L{length}-B{batch}"
            measured = out["variants"].get(variant.name, {})
            if (length, batch) == (workload.response_length, workload.batch_size) and "summary" in measured:
                out["scaling"][label] = {**measured, "same_as": variant.name}
            elif not over_budget(label):
                out["scaling"][label] = run_engine_variant(wl, variant, work, cpus, args.variant_timeout, label=label)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = report.timeline_png(out["variants"], args.out_dir / f"e2e_{args.tag}_timeline.png")
    out["timeline_png"] = str(png) if png else None
    record = run.finish(out)
    print(report.render(record))
    save(args.out_dir / f"e2e_{args.tag}.json", record)
    if png:
        print(f"wrote {png}")
    return record


if __name__ == "__main__":
    main()
