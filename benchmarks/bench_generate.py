"""Generation throughput and weight-update latency: vLLM vs transformers, same model, same prompts.

Each backend runs in its own fresh process (as a generator process would), on a ~38 M-parameter
Llama built from scratch (hidden 512, 8 layers, 8 heads -> head_dim 64, vocab 4096; at a 0.3 M
toy, per-call overheads dominate and say nothing about generation). Per backend:

- start_s        building the `Generator` (vLLM: engine start; transformers: model load)
- tokens/s       PROMPTS prompts x NEW_TOKENS sampled tokens (ignore_eos, temperature 1), best of --reps
                 after one warm-up call
- update_ms      `update_weights` with a full fp32 state dict (median of --reps, after a first one that
                 also creates the staging file): vLLM copies it into the shared-memory staging file
                 and reloads it in the engine, then resets the prefix cache (the split is recorded)

`vllm` runs the engine in vLLM's own spawned engine process (`engine_process=True`),
`vllm-in-process` inside the generator process (`engine_process=False`, the default); either way vLLM's CPU worker binds
its torch threads to cores (it reserves one core of this 2-core machine for the caller);
transformers uses torch's default threads. On a shared machine the load average (recorded) moves
the numbers: compare runs by their ratios.

Usage: python benchmarks/bench_generate.py [--prompts 64] [--new-tokens 128] [--reps 3]
                                           [--backends vllm,transformers] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPEC = dict(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, max_position_embeddings=1024)


def build_model(path: Path) -> int:
    """Save the benchmark model + tokenizer into `path`; returns the parameter count."""
    from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer

    spec = TinyLlamaSpec(**SPEC)
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_llama(spec, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def bench_prompts(model_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rlhf_engine.data.synthetic import synthetic_sentences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [[tokenizer.bos_token_id, *tokenizer(" ".join(s.split()[:4])).input_ids] for s in synthetic_sentences(n, seed=3)]


def worker(backend: str, model_dir: str, n_prompts: int, new_tokens: int, reps: int) -> dict:
    """Runs in a fresh process: measure one backend."""
    import torch

    from rlhf_engine.rollout.backends import make_generator
    from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig

    prompts = bench_prompts(Path(model_dir), n_prompts)
    config = GeneratorConfig(model=model_dir, backend=backend.removesuffix("-in-process"), max_model_len=512,
                             kv_cache_bytes=1 << 28, max_batch_size=n_prompts,
                             engine_process=not backend.endswith("-in-process"))
    t0 = time.perf_counter()
    gen = make_generator(config)
    start_s = time.perf_counter() - t0
    try:
        sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
        gen.generate(prompts[:8], sampling=SamplingConfig(max_new_tokens=8, ignore_eos=True))  # warm-up
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            out = gen.generate(prompts, sampling=sampling, seed=r)
            times.append(time.perf_counter() - t0)
        tokens = sum(len(c.response_ids) for c in out)
        g = torch.Generator().manual_seed(0)
        state = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in gen.expected.items()}
        update_ms, split_ms = [], []
        for r in range(reps + 1):  # the first update also creates the staging file: reported apart
            t0 = time.perf_counter()
            assert gen.update_weights(gen.version + 1, state)
            update_ms.append((time.perf_counter() - t0) * 1e3)
            split_ms.append([round(x * 1e3, 1) for x in getattr(gen, "last_update_s", ())])
        out = gen.generate(prompts[:4], sampling=SamplingConfig(max_new_tokens=4, ignore_eos=True))  # still serves
        return {
            "backend": backend, "start_s": round(start_s, 2), "tokens": tokens,
            "gen_s_best": round(min(times), 3), "gen_s_all": [round(t, 3) for t in times],
            "tokens_per_s": round(tokens / min(times), 1),
            "update_ms_first": round(update_ms[0], 1),
            "update_ms_median": round(statistics.median(update_ms[1:]), 1), "update_ms_all": [round(t, 1) for t in update_ms],
            "update_stage_reload_ms": split_ms,
            "update_mb": round(sum(t.numel() * 4 for t in state.values()) / 1e6, 1),
            "torch_threads": torch.get_num_threads(),
        }
    finally:
        gen.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="vllm,vllm-in-process,transformers",
                        help="vllm (vLLM's own engine process), vllm-in-process (engine in the generator process), transformers")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate_cpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # child mode: one backend, one JSON line on stdout
        result = worker(args.worker, args.model_dir, args.prompts, args.new_tokens, args.reps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from provenance import Provenance

    run = Provenance.start("generate")
    info = {"prompts": args.prompts, "new_tokens": args.new_tokens, "reps": args.reps, "dtype": "float32"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        info["model_params"] = build_model(Path(tmp))
        info["model"] = SPEC
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--worker", backend, "--model-dir", tmp, "--prompts", str(args.prompts),
                   "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{backend} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))

    print(f"\n{info['model_params'] / 1e6:.1f} M params, {args.prompts} prompts x {args.new_tokens} new tokens, fp32")
    print(f"{'backend':<21}{'start s':>9}{'tokens/s':>11}{'gen s':>9}{'update ms':>11}{'first ms':>10}{'MB':>7}")
    for r in rows:
        print(f"{r['backend']:<21}{r['start_s']:>9.1f}{r['tokens_per_s']:>11.0f}{r['gen_s_best']:>9.2f}"
              f"{r['update_ms_median']:>11.1f}{r['update_ms_first']:>10.1f}{r['update_mb']:>7.1f}")
    run.write(args.out, {"info": info, "results": rows})


if __name__ == "__main__":
    main()
