"""Weight sync of a LoRA policy, adapters only (`model.lora.sync: adapters`) against full weights.

1. sizes, computed from parameter counts (meta-device models, no weights): the bytes one sync
   carries with full weights and with LoRA r=16 adapters (fp32, peft's names), on the ~38 M bench
   model and on a Qwen2.5-0.5B-shaped config (full weights in bf16, as that model is stored).
2. time per sync on the bench model: the transport (trainer -> a generator process over ipc +
   shared memory, until its ack: `bench_weight_sync.bench_transport`) and applying the update in a
   running generator (vLLM: `reload_weights` of every weight vs a new LoRA adapter; transformers:
   in-place copies), medians over --reps after one warm-up update.
3. end to end: the same PPO run (bench_e2e's workload, variant pinned/async-s1) with full weights
   and with LoRA r=16 adapters, one after the other: seconds per step, the trainer's weight-sync
   seconds, the generator's seconds applying each update.

    python benchmarks/bench_lora_sync.py [--reps 5] [--steps 6] [--no-e2e] [--out benchmarks/results/lora_sync_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_weight_sync, bench_e2e and benchmarks/e2e

HERE = Path(__file__).resolve().parent
LORA = {"r": 16, "alpha": 32.0}
"""The compared adapters: rank 16 on q/k/v/o (LoraConfig's default targets)."""
QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "tie_word_embeddings": True, "max_position_embeddings": 32768}
"""Qwen2.5-0.5B's shape (its config.json): 494 M parameters, tied embeddings."""


def nbytes(specs) -> int:
    return sum(torch.Size(shape).numel() * getattr(torch, dtype).itemsize for _, shape, dtype in specs)


def numel(specs) -> int:
    return sum(torch.Size(shape).numel() for _, shape, _ in specs)


def sizes(model_dir: str, full_dtype: str) -> dict:
    """Parameters and bytes of one sync, full (in `full_dtype`) vs adapters (fp32), for the model in
    `model_dir` (only its config is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_engine.models.lora import LoraConfig
    from rlhf_engine.transport.weights import adapter_specs

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    # what the trainer publishes: its state dict (a tied lm_head listed under its own name too)
    full = [(name, tuple(t.shape), full_dtype) for name, t in model.state_dict().items()]
    out = {"model_params": sum(p.numel() for p in model.parameters()),  # a tied lm_head counted once
           "full": {"tensors": len(full), "params": numel(full), "bytes": nbytes(full), "dtype": full_dtype}}
    for label, targets in (("lora_r16_qkvo", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("lora_r16_all_linear", "all-linear")):
        specs = adapter_specs(model_dir, LoraConfig(**LORA, target_modules=targets))
        out[label] = {"tensors": len(specs), "params": numel(specs), "bytes": nbytes(specs), "dtype": "float32",
                      "bytes_vs_full": nbytes(specs) / nbytes(full)}
    return out


def qwen_dir(work: Path) -> str:
    from transformers import AutoConfig

    path = work / "qwen2.5-0.5b-shape"
    config = dict(QWEN_05B)
    AutoConfig.for_model(config.pop("model_type"), **config).save_pretrained(path)
    return str(path)


def update_tensors(specs, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.01 * torch.randn(shape, generator=g).to(getattr(torch, dtype)) for name, shape, dtype in specs}


def transport_times(specs, reps: int) -> list[float]:
    """Seconds from publish to the generator process's ack (ipc + shared memory, not applied)."""
    from bench_weight_sync import Memcpy, bench_transport

    sd = update_tensors(specs, seed=0)
    with tempfile.TemporaryDirectory(prefix="bls-") as tmp:
        times, _, _ = bench_transport(sd, Memcpy(sd), f"ipc://{tmp}/ep", True, False, reps)
    return times


def apply_times(model_dir: str, backend: str, lora, reps: int) -> dict:
    """Seconds of `Generator.update_weights` in a running generator (first update left out: it creates
    the staging file / folder), with vLLM's split (write, load) of each."""
    from rlhf_engine.rollout.backends import make_generator
    from rlhf_engine.rollout.config import GeneratorConfig

    staging = tempfile.mkdtemp(prefix="bls-staging-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        config = GeneratorConfig(model=model_dir, backend=backend, max_model_len=256, kv_cache_bytes=1 << 28,
                                 device="cpu", staging_dir=staging, lora=lora)
        t0 = time.perf_counter()
        gen = make_generator(config)
        start_s = time.perf_counter() - t0
        try:
            times, parts = [], []
            for version in range(1, reps + 2):
                update = update_tensors(gen.weight_specs, seed=version)
                t0 = time.perf_counter()
                gen.update_weights(version, update)
                times.append(time.perf_counter() - t0)
                parts.append(list(getattr(gen, "last_update_s", ())))
        finally:
            gen.close()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"median_s": statistics.median(times[1:]), "times_s": times[1:], "parts_s": parts[1:], "start_s": start_s}


def sync_section(model_dir: str, reps: int) -> dict:
    from rlhf_engine.models.lora import LoraConfig
    from rlhf_engine.transport.weights import weight_specs

    out = {}
    for label, lora in (("full", None), ("lora_r16_qkvo", LoraConfig(**LORA))):
        specs = weight_specs(model_dir, lora)
        entry = {"bytes": nbytes(specs), "tensors": len(specs)}
        times = transport_times(specs, reps)
        entry["transport"] = {"median_s": statistics.median(times), "times_s": times}
        for backend in ("vllm", "transformers"):
            entry[f"apply_{backend}"] = apply_times(model_dir, backend, lora, reps)
        entry["total_vllm_s"] = entry["transport"]["median_s"] + entry["apply_vllm"]["median_s"]
        out[label] = entry
        print(f"  {label:14s} {entry['bytes'] / 1e6:9.2f} MB  transport {entry['transport']['median_s'] * 1e3:8.1f} ms  "
              f"apply vLLM {entry['apply_vllm']['median_s'] * 1e3:8.1f} ms  transformers "
              f"{entry['apply_transformers']['median_s'] * 1e3:8.1f} ms", flush=True)
    return out


def e2e_section(model_dir: str, work: Path, steps: int, timeout: float) -> dict:
    import bench_e2e
    from e2e import analysis
    from e2e.workload import Workload, available_cpus, parse_variant, run_config, write_prompts

    workload = Workload(model=model_dir, prompts=str(write_prompts(work / "prompts.jsonl")), steps=steps)
    variant, cpus = parse_variant("pinned/async-s1"), available_cpus()
    out = {"variant": variant.name, "steps": steps, "warmup_steps": workload.warmup_steps}
    for label, lora in (("full", None), ("lora_r16_qkvo", {**LORA, "sync": "adapters"})):
        run_dir = work / "runs" / label
        shutil.rmtree(run_dir, ignore_errors=True)  # a run appends to the metrics of an earlier one
        config = run_config(workload, variant, run_dir, cpus)
        if lora is not None:
            config["model"]["lora"] = lora
        print(f"-- e2e {label}: {steps} steps", flush=True)
        result, info = bench_e2e._child("run_variant.py", {"config": config, "steps": steps}, label, work, timeout)
        entry = {"run": info}
        if result is not None:
            s = analysis.summarize(result, warmup=workload.warmup_steps, batch_size=workload.batch_size)
            loop = result["loop_stats"].get("generator-0", {})
            entry.update(s_per_step=s["s_per_step"], samples_per_s=s["samples_per_s"], phases_s=s["phases_s"],
                         idle_trainer=s["idle_trainer"], idle_generator=s["idle_generator"],
                         generator_apply_s_per_update=loop.get("update_s", float("nan")) / max(loop.get("updates_applied", 0), 1),
                         loop_stats=loop)
            print(f"   {s['s_per_step']:.2f} s/step, weight sync (trainer) {s['phases_s']['weight_sync'] * 1e3:.1f} ms, "
                  f"apply (generator) {entry['generator_apply_s_per_update'] * 1e3:.1f} ms per update", flush=True)
        out[label] = entry
    if "s_per_step" in out["full"] and "s_per_step" in out["lora_r16_qkvo"]:
        out["lora_vs_full_s_per_step"] = out["lora_r16_qkvo"]["s_per_step"] / out["full"]["s_per_step"]
    return out


def main() -> None:
    from e2e.workload import BENCH_MODEL, build_model
    from provenance import Provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local HF causal-LM folder (default: build the ~38 M bench model)")
    parser.add_argument("--reps", type=int, default=5, help="timed syncs per case (after one warm-up)")
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per end-to-end run")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True, help="the end-to-end runs")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rlhf_bench_lora"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before an end-to-end run is killed")
    parser.add_argument("--out", default=str(HERE / "results" / "lora_sync_cpu.json"))
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(build_model(args.work_dir / "model38m", BENCH_MODEL))
    run = Provenance.start("lora_sync")
    print("sizes (computed from parameter counts)", flush=True)
    size = {"bench_model": sizes(model_dir, "float32"), "qwen2.5-0.5b_shape": sizes(qwen_dir(args.work_dir), "bfloat16")}
    for name, s in size.items():
        print(f"  {name:20s} {s['model_params'] / 1e6:.1f} M params; full sync {s['full']['bytes'] / 1e6:9.1f} MB "
              f"({s['full']['params'] / 1e6:.1f} M values, "
              f"{s['full']['dtype']})  LoRA r16 qkvo {s['lora_r16_qkvo']['bytes'] / 1e6:7.2f} MB "
              f"({s['lora_r16_qkvo']['bytes_vs_full']:.2%})  all-linear {s['lora_r16_all_linear']['bytes'] / 1e6:7.2f} MB "
              f"({s['lora_r16_all_linear']['bytes_vs_full']:.2%})", flush=True)
    print("time per sync on the bench model", flush=True)
    sync = sync_section(model_dir, args.reps)
    e2e = e2e_section(model_dir, args.work_dir, args.steps, args.timeout) if args.e2e else None
    out = {
        "model": model_dir, "lora": LORA, "reps": args.reps,
        "sizes": size, "sync": sync, "e2e": e2e,
        "notes": "transport = publish until the generator process acked (ipc + shared memory, not applied); "
                 "apply = Generator.update_weights in a running generator (vLLM full: staging copy + reload_weights "
                 "+ prefix-cache reset; vLLM LoRA: PEFT folder write + add_lora + remove_lora of the previous "
                 "adapter); medians after one warm-up update. e2e: bench_e2e's workload and variant, one run each.",
    }
    run.write(args.out, out)


if __name__ == "__main__":
    main()
