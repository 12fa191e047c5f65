"""One AdamW step over the parameters of the end-to-end benchmark's 38 M Llama: torch's default
implementation against the fused one the trainers use (`rlhf_engine.trainer.optim.adamw`), side by side in
one run.

    python benchmarks/bench_optimizer.py [--repeat 20] [--threads N] [--out PATH]

Prints a table and writes JSON (machine, versions, date, load average) to
benchmarks/results/optimizer_cpu.json. Compare only the ratio of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import Provenance  # noqa: E402

from benchmarks.e2e.workload import BENCH_MODEL  # noqa: E402
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer  # noqa: E402
from rlhf_engine.trainer.optim import adamw  # noqa: E402


def step_times(make_optimizer, params: list[torch.nn.Parameter], repeat: int) -> list[float]:
    optimizer = make_optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # warm-up: the state is created here
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimizer_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = BENCH_MODEL
    spec = TinyLlamaSpec(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                         num_heads=shape.num_heads, intermediate_size=shape.intermediate_size)
    model = build_llama(spec, build_tokenizer(shape.vocab_size), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    run = Provenance.start("optimizer")
    variants = {
        "default": lambda ps: torch.optim.AdamW(ps, lr=1e-5),
        "fused (ours)": lambda ps: adamw(ps, lr=1e-5),
    }
    rows = {}
    for _ in range(2):  # interleaved twice: both see the same machine
        for name, make in variants.items():
            params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
            rows.setdefault(name, []).extend(step_times(make, params, args.repeat))
    result = {
        "threads": args.threads, "parameters": n_params,
        "variants": {name: {"median_s": statistics.median(t), "best_s": min(t), "steps": len(t)}
                     for name, t in rows.items()},
    }
    base = result["variants"]["default"]["median_s"]
    print(f"AdamW step over {n_params / 1e6:.1f} M parameters, {args.threads} threads")
    print(f"{'implementation':<16}{'median ms':>11}{'best ms':>10}{'speed-up':>10}")
    for name, r in result["variants"].items():
        print(f"{name:<16}{r['median_s'] * 1e3:>11.1f}{r['best_s'] * 1e3:>10.1f}{base / r['median_s']:>9.2f}x")
    run.write(args.out, result)


if __name__ == "__main__":
    main()
