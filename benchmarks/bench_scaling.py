"""Trainer scaling: PPO step time, peak memory and parameter + optimizer bytes per rank at 1 and 2 ranks.

The same 38 M-parameter Llama as bench_e2e (hidden 512, 8 layers, vocab 4096) with a value head, the same
global batch and fixed token batches (no generators: this measures the trainer alone), gloo on the CPU.
1 rank runs with 2 threads, 2 ranks with 1 thread each (this box has 2 cores), so the ideal speed-up is 1
and the interesting numbers are the per-rank bytes (FSDP2 should halve them) and the overhead of the
collectives. Also the time to gather the full policy weights from the shards (what weight sync costs the
trainer before staging).

    python benchmarks/bench_scaling.py                 # writes benchmarks/results/scaling_cpu.json
    python benchmarks/bench_scaling.py --steps 2 --batch-size 8 --tag quick
    python benchmarks/bench_scaling.py --ranks 1 --threads 1 --tag cpu_1rank_1thread   # one core's worth

Each rank count runs in its own `torchrun` job (this file with --worker).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the helpers in benchmarks/e2e

RESULTS = HERE / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=16, help="global samples per step")
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--model", help="HF folder (default: build the bench_e2e 38 M Llama)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--tag", default="cpu", help="results file: scaling_<tag>.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the per-rank JSON output directory
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# one rank (under torchrun)
# ---------------------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch

    from rlhf_engine.distributed import Comm, DistributedConfig, destroy_process_group, init_process_group
    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
    from rlhf_engine.trainer.ppo.config import PPOConfig
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer

    parallel = DistributedConfig(backend="gloo", fsdp=args.fsdp)
    _, device = init_process_group(parallel)
    comm = Comm.from_process_group(device)
    cfg = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=1,
                    learning_rate=1e-5, response_length=args.response_length, seed=0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model)
    trainer = PPOTrainer(config=cfg, model=model, comm=comm, parallel=parallel)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(4, vocab, (args.prompt_length,), generator=g) for _ in range(args.batch_size)]
    responses = [torch.randint(4, vocab, (args.response_length,), generator=g) for _ in range(args.batch_size)]
    scores = torch.randn(args.batch_size, generator=g)
    step_s, gather_s = [], []
    for i in range(args.steps + 1):
        comm.barrier()
        t0 = time.perf_counter()
        trainer.step(queries, responses, scores)
        comm.barrier()
        t1 = time.perf_counter()
        n = sum(t.numel() for _, t in trainer.policy_weights())  # gathered one tensor at a time
        t2 = time.perf_counter()
        if i > 0:  # the first step warms up (lazy FSDP init, allocator)
            step_s.append(t1 - t0)
            gather_s.append(t2 - t1)

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    optim = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "step_s_median": statistics.median(step_s),
        "weight_gather_s_median": statistics.median(gather_s),
        "gathered_numel": n,
        "param_bytes": sum(local_bytes(p) for p in params),
        "optimizer_bytes": sum(local_bytes(t) for t in optim),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.worker, f"rank{comm.rank}.json").write_text(json.dumps(out))
    destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------
def run_ranks(args: argparse.Namespace, nproc: int, model: Path, out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", __file__, "--worker", str(out_dir), "--model", str(model),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--mini-batch-size", str(args.mini_batch_size), "--prompt-length", str(args.prompt_length),
           "--response-length", str(args.response_length), "--fsdp" if args.fsdp else "--no-fsdp"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)  # default: every rank count uses all cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from e2e.workload import BENCH_MODEL, build_model
    from provenance import Provenance

    from rlhf_engine.models.tiny import TinyLlamaSpec  # noqa: F401  (fails early without the package)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(Path(tmp) / "model", BENCH_MODEL)
        run = Provenance.start("scaling")
        result = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": {}}
        for nproc in [int(x) for x in args.ranks.split(",")]:
            t0 = time.time()
            ranks = run_ranks(args, nproc, model, Path(tmp) / f"ranks{nproc}")
            result["runs"][str(nproc)] = {"wall_s": time.time() - t0, "load_average_after": os.getloadavg(),
                                         "ranks": ranks}
    runs = result["runs"]
    if "1" in runs and "2" in runs:
        one, two = runs["1"]["ranks"][0], runs["2"]["ranks"]
        t1, t2 = one["step_s_median"], max(r["step_s_median"] for r in two)
        result["summary"] = {
            "step_s_1_rank": t1, "step_s_2_ranks": t2,
            "speedup_2_vs_1": t1 / t2,
            "scaling_efficiency": t1 / t2 / 1.0,  # ideal speed-up is 1 here: the same 2 cores either way
            "param_plus_optimizer_bytes_per_rank_1": one["param_bytes"] + one["optimizer_bytes"],
            "param_plus_optimizer_bytes_per_rank_2": [r["param_bytes"] + r["optimizer_bytes"] for r in two],
            "peak_rss_mib_1": one["peak_rss_mib"], "peak_rss_mib_2": [r["peak_rss_mib"] for r in two],
            "weight_gather_s_1": one["weight_gather_s_median"], "weight_gather_s_2": two[0]["weight_gather_s_median"],
        }
    print(json.dumps(result.get("summary", result["runs"]), indent=2))
    run.write(RESULTS / f"scaling_{args.tag}.json", result)


if __name__ == "__main__":
    main()
