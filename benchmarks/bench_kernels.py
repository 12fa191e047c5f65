"""Kernel benchmark: fused log-probs, log-probs from hidden states, and GAE against eager PyTorch,
TRL and TorchRL (when installed).

Prints a table and writes JSON to benchmarks/results/kernels_<device>_<date>.json with the machine,
CPU model, versions, thread count and load average (the CPU machines are shared: read the load).

Times are the median and the best of `--repeat` runs after one warm-up. Peak extra memory:
  cpu:  the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
        over its resident set before the call. Tensors this large are mmap-backed and go back to
        the OS when freed, so this counts the pages the call touched beyond its inputs.
  cuda: torch.cuda.max_memory_allocated() during the call minus memory allocated before it.
Log-probs from hidden states (section `hidden`): logprobs_from_hidden against the eager LM head
(`hidden @ W.T` -> log_softmax -> gather) and against the eager LM head + our logits op
(logprobs_from_logits). On the CPU each row runs in a FRESH SUBPROCESS (on
cuda in this process): one call on a tiny problem (first-call setup), inputs built, on cuda one
full warm-up call, `--repeat` timed calls (on the CPU no full-size warm-up: a call takes seconds). Peak extra memory on the CPU is the VmHWM rise over those
calls, with MALLOC_MMAP_THRESHOLD_=65536 so that every freed buffer above 64 KiB goes back to the
OS: the high-water mark then follows the live bytes. `extra` includes the gradients the call
returns (grad_hidden, grad_weight: the same bytes for every impl); `workspace` is extra minus those.
The bandwidth floor of a row is the bytes the op must move (forward: read the logits once;
forward+backward: read them twice and write the gradient once) over the copy_ bandwidth
measured in this run. `--model h100` adds a column with bytes / 3.35 TB/s: a MODEL, not a measurement.

Usage: python benchmarks/bench_kernels.py [--device cpu|cuda] [--model h100] [--n 4096] [--repeat 5]
       [--vocabs 32000,151936] [--hidden-shapes 4096x512x32000,1024x896x151936]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import Provenance

from rlhf_engine.ops import gae, logprobs_from_hidden, logprobs_from_logits
from rlhf_engine.ops._library import resolve_device
from rlhf_engine.ops.reference import gae_reference

H100_BYTES_PER_S = 3.35e12
RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory the call needs beyond what is allocated before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _rss()["VmRSS"]
    out = fn()
    peak = _rss()["VmHWM"]
    del out
    return peak - base


def time_ms(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, float]:
    """(median, best) wall time in ms over `repeat` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of copy_ over 512 MiB fp32 (read + write), best of 5."""
    src = torch.randn(128 << 20, device=device)
    dst = torch.empty_like(src)
    _, best_ms = time_ms(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() * 4 / (best_ms / 1e3)


def _eager_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _logprob_impls() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    impls = {"rlhf_engine": logprobs_from_logits, "eager log_softmax+gather": _eager_logprobs}
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        pass
    else:
        impls["trl selective_log_softmax"] = selective_log_softmax
    return impls


def bench_logprobs(args, bandwidth: float) -> list[dict]:
    rows = []
    impls = _logprob_impls()
    for v in (int(x) for x in args.vocabs.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=args.device).manual_seed(0)
            logits = torch.randn(args.n, v, device=args.device, generator=gen).to(dtype)  # [N, V]
            labels = torch.randint(0, v, (args.n,), device=args.device, generator=gen)  # [N]
            logit_bytes = logits.numel() * logits.element_size()
            for mode, moved in (("fwd", logit_bytes), ("fwd+bwd", 3 * logit_bytes)):
                for name, impl in impls.items():
                    if mode == "fwd":

                        def run(impl=impl):
                            with torch.no_grad():
                                return impl(logits, labels)

                    else:

                        def run(impl=impl):
                            logits.requires_grad_(True)
                            logits.grad = None
                            impl(logits, labels).sum().backward()
                            grad, logits.grad = logits.grad, None
                            logits.requires_grad_(False)
                            return grad

                    slow = name.startswith("trl")
                    if slow and v > args.trl_max_v:
                        continue
                    median, best = time_ms(run, args.device, 1 if slow else args.repeat)
                    extra = peak_extra_bytes(run, args.device)
                    row = dict(
                        op="logprobs", mode=mode, impl=name, n=args.n, v=v, dtype=str(dtype).removeprefix("torch."),
                        median_ms=median, best_ms=best, floor_ms=moved / bandwidth * 1e3,
                        peak_extra_mb=extra / 2**20, extra_frac_of_logits=extra / logit_bytes,
                    )
                    if args.model == "h100":
                        row["h100_model_ms"] = moved / H100_BYTES_PER_S * 1e3
                    rows.append(row)
                    print(_fmt(row), flush=True)
            logits = None  # the [N, V] buffer goes before the next shape
    return rows


HIDDEN_SHAPES = ((4096, 512, 32000), (1024, 896, 151936))  # (N, H, V)
HIDDEN_SHAPES_QUICK = ((256, 64, 4000),)  # --quick: a smoke run of every code path


def _hidden_impls() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    def eager(h, w, y):
        return _eager_logprobs(torch.mm(h, w.t()), y)  # [N, V] logits, log_softmax [N, V]

    def eager_head_our_logits(h, w, y):
        return logprobs_from_logits(torch.mm(h, w.t()), y)

    return {
        "rlhf_engine logprobs_from_hidden": lambda h, w, y: logprobs_from_hidden(h, w, y),
        "eager lm_head+log_softmax+gather": eager,
        "eager lm_head+logprobs_from_logits": eager_head_our_logits,
    }


def hidden_case(n: int, h: int, v: int, dtype: torch.dtype, mode: str, impl: str, device: str):
    """The call of one hidden row (fwd, or fwd+bwd returning the gradients) on fresh inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)  # [N, H]
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype)  # [V, H]
    labels = torch.randint(0, v, (n,), device=device, generator=gen)  # [N]
    fn = _hidden_impls()[impl]
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(hidden, weight, labels)

        return run
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def run():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).sum().backward()
        grads, hidden.grad, weight.grad = (hidden.grad, weight.grad), None, None
        return grads

    return run


def hidden_row_subprocess(case: dict, repeat: int) -> dict:
    """{median_ms, best_ms, peak_extra_bytes} of one hidden row, run by this script in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--hidden-row", json.dumps({**case, "repeat": repeat})]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"subprocess for hidden row {case} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hidden_row(case_json: str) -> None:
    """The child of hidden_row_subprocess: prints one JSON line."""
    print(json.dumps(measure_hidden_row(json.loads(case_json))))


def measure_hidden_row(case: dict) -> dict:
    """{median_ms, best_ms, peak_extra_bytes} of one hidden row in this process (see module docstring)."""
    case = dict(case)
    repeat, device = case.pop("repeat"), case["device"]
    dtype = getattr(torch, case["dtype"])
    hidden_case(**{**case, "n": 8, "v": 64, "dtype": dtype})()  # first-call setup (dispatch, thread pools)
    run = hidden_case(**{**case, "dtype": dtype})
    if device == "cuda":
        run()  # warm-up: cuBLAS handles, kernel loading
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _rss()["VmRSS"]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss()["VmHWM"]
    return dict(median_ms=statistics.median(times), best_ms=min(times), peak_extra_bytes=peak - base)


def bench_hidden(args, bandwidth: float) -> list[dict]:
    rows = []
    shapes = HIDDEN_SHAPES_QUICK if args.quick else HIDDEN_SHAPES
    if args.hidden_shapes:
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.hidden_shapes.split(","))
    for n, h, v in shapes:
        for dtype in (getattr(torch, d) for d in args.hidden_dtypes.split(",")):
            size = torch.empty((), dtype=dtype).element_size()
            logit_bytes = n * v * size
            # Unavoidable traffic: read hidden and weight (fwd); fwd+bwd reads them again and
            # writes grad_hidden and grad_weight. Matmul-bound in practice: the floor is a bound only.
            io = (n * h + v * h) * size
            for mode, moved in (("fwd", io), ("fwd+bwd", 3 * io)):
                for impl in _hidden_impls():
                    dt = str(dtype).removeprefix("torch.")
                    case = dict(n=n, h=h, v=v, dtype=dt, mode=mode, impl=impl, device=args.device)
                    result_bytes = n * 4 if mode == "fwd" else (n * h + v * h) * size  # logprob / grads
                    # CPU: a fresh process per row (clean resident set); CUDA: the allocator's exact peak.
                    m = (hidden_row_subprocess(case, args.repeat) if args.device == "cpu"
                         else measure_hidden_row({**case, "repeat": args.repeat}))
                    extra = m["peak_extra_bytes"]
                    row = dict(
                        op="hidden", mode=mode, impl=impl, n=n, h=h, v=v, dtype=dt,
                        median_ms=m["median_ms"], best_ms=m["best_ms"], floor_ms=moved / bandwidth * 1e3,
                        peak_extra_mb=extra / 2**20, workspace_mb=(extra - result_bytes) / 2**20,
                        extra_frac_of_logits=extra / logit_bytes,
                    )
                    if args.model == "h100":
                        row["h100_model_ms"] = moved / H100_BYTES_PER_S * 1e3
                    rows.append(row)
                    print(_fmt(row), flush=True)
    return rows


def _hidden_ratios(rows: list[dict]) -> list[dict]:
    """Each eager hidden row against logprobs_from_hidden: time (ours / theirs) and memory (theirs / ours)."""
    out = []
    ours = {(r["mode"], r["n"], r["v"], r["dtype"]): r for r in rows if r["impl"] == "rlhf_engine logprobs_from_hidden"}
    for r in rows:
        key = (r["mode"], r["n"], r["v"], r["dtype"])
        if r["op"] == "hidden" and key in ours and r is not ours[key]:
            o = ours[key]
            out.append(dict(
                mode=r["mode"], n=r["n"], v=r["v"], dtype=r["dtype"], against=r["impl"],
                time_ours_over_theirs_median=o["median_ms"] / r["median_ms"],
                peak_extra_theirs_over_ours=r["peak_extra_mb"] / o["peak_extra_mb"],
                workspace_theirs_over_ours=r["workspace_mb"] / max(o["workspace_mb"], 1e-9),
            ))
    return out


def python_loop_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> list[list[float]]:
    """Pure-Python reverse double loop over nested lists (all positions valid)."""
    r, v = rewards.tolist(), values.tolist()
    out = []
    for rr, vv in zip(r, v):
        adv, last, next_v = [0.0] * len(rr), 0.0, 0.0
        for t in range(len(rr) - 1, -1, -1):
            last = rr[t] + gamma * next_v - vv[t] + gamma * lam * last
            adv[t], next_v = last, vv[t]
        out.append(adv)
    return out


def torch_loop_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Unmasked reverse loop over T, vectorized over B (the common trainer implementation)."""
    b, t_len = rewards.shape
    adv = torch.empty_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros_like(last)
    for t in range(t_len - 1, -1, -1):
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
        adv[:, t] = last
        next_v = values[:, t]
    return adv


def bench_gae(args) -> list[dict]:
    b, t_len, gamma, lam = 256, 1024, 0.99, 0.95
    gen = torch.Generator(device=args.device).manual_seed(0)
    rewards = torch.randn(b, t_len, device=args.device, generator=gen)
    values = torch.randn(b, t_len, device=args.device, generator=gen)
    full = torch.ones(b, t_len, dtype=torch.bool, device=args.device)
    lengths = torch.randint(1, t_len + 1, (b,), device=args.device, generator=gen)
    prefix = torch.arange(t_len, device=args.device)[None, :] < lengths[:, None]  # right-padded rows
    impls = {
        "rlhf_engine gae (all valid)": lambda: gae(rewards, values, full, gamma, lam),
        "rlhf_engine gae (random lengths)": lambda: gae(rewards, values, prefix, gamma, lam),
        "torch loop over T": lambda: torch_loop_gae(rewards, values, gamma, lam),
        "torch loop over T, masked (reference.py)": lambda: gae_reference(rewards, values, prefix, gamma, lam),
    }
    if args.device == "cpu":
        impls["python double loop"] = lambda: python_loop_gae(rewards, values, gamma, lam)
    try:
        from torchrl.objectives.value.functional import vec_generalized_advantage_estimate
    except ImportError:
        pass
    else:
        r3, v3 = rewards.unsqueeze(-1), values.unsqueeze(-1)  # [B, T, 1]
        next_v = torch.cat([v3[:, 1:], torch.zeros_like(v3[:, :1])], dim=1)
        done = torch.zeros_like(r3, dtype=torch.bool)
        done[:, -1] = True
        impls["torchrl vec_generalized_advantage_estimate"] = lambda: vec_generalized_advantage_estimate(
            gamma, lam, v3, next_v, r3, done, done, time_dim=-2
        )
    rows = []
    for name, fn in impls.items():
        repeat = 3 if name == "python double loop" else max(args.repeat, 20)
        median, best = time_ms(fn, args.device, repeat)
        row = dict(op="gae", mode="fwd", impl=name, n=b, v=t_len, dtype="float32", median_ms=median, best_ms=best)
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    s = f"{row['op']:<9}{row['mode']:<8}{row['impl']:<44}{row['n']:>6}{row['v']:>8} {row['dtype']:<9}"
    if "workspace_mb" in row:
        s = s.rstrip() + f" H={row['h']:<5}"
    s += f"{row['median_ms']:>10.2f}{row['best_ms']:>10.2f}"
    if "floor_ms" in row:
        s += f"{row['floor_ms']:>10.2f}{row['best_ms'] / row['floor_ms']:>8.2f}x{row['peak_extra_mb']:>11.1f}"
        s += f"{100 * row['extra_frac_of_logits']:>8.1f}%"
    if "workspace_mb" in row:
        s += f"{row['workspace_mb']:>10.1f}"
    if "h100_model_ms" in row:
        s += f"{row['h100_model_ms']:>10.3f}"
    return s


def _speedups(rows: list[dict]) -> list[dict]:
    """rlhf_engine's best time against each other implementation of the same row."""
    out = []
    ours = {(r["op"], r["mode"], r["v"], r["dtype"]): r for r in rows if r["impl"] == "rlhf_engine"}
    for r in rows:
        key = (r["op"], r["mode"], r["v"], r["dtype"])
        if r["op"] == "logprobs" and r["impl"] != "rlhf_engine" and key in ours:
            out.append(dict(op=r["op"], mode=r["mode"], v=r["v"], dtype=r["dtype"], against=r["impl"],
                            speedup_best=r["best_ms"] / ours[key]["best_ms"],
                            speedup_median=r["median_ms"] / ours[key]["median_ms"]))
    gae_ours = [r for r in rows if r["impl"] == "rlhf_engine gae (all valid)"]
    for r in rows:
        if r["op"] == "gae" and gae_ours and not r["impl"].startswith("rlhf_engine"):
            out.append(dict(op="gae", against=r["impl"], speedup_best=r["best_ms"] / gae_ours[0]["best_ms"],
                            speedup_median=r["median_ms"] / gae_ours[0]["median_ms"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["h100"], default=None, help="add a modeled-time column (bytes / HBM bandwidth)")
    parser.add_argument("--n", type=int, default=4096, help="rows of logits")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per log-prob row (GAE: at least 20)")
    parser.add_argument("--skip-logprobs", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --n 256, one small hidden shape, 1 timed run (checks the script, not speed)")
    parser.add_argument("--sections", default="logprobs,hidden,gae",
                        help="comma-separated subset of logprobs,hidden,gae (default: all)")
    parser.add_argument("--vocabs", default="32000,151936",
                        help="logprobs rows: comma-separated vocabulary sizes V (e.g. 32000,49152,151936)")
    parser.add_argument("--hidden-shapes", default=None,
                        help="hidden rows: comma-separated NxHxV (default 4096x512x32000,1024x896x151936)")
    parser.add_argument("--hidden-dtypes", default="float32,bfloat16", help="hidden rows: comma-separated dtypes")
    parser.add_argument("--hidden-row", default=None, help=argparse.SUPPRESS)  # internal: one subprocess row
    parser.add_argument("--trl-max-v", type=int, default=32000,
                        help="largest V for TRL rows (one timed run each: on the CPU they take tens of seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/kernels_<device>_<date>.json)")
    args = parser.parse_args()
    if args.hidden_row:
        _hidden_row(args.hidden_row)
        return
    resolve_device(args.device, "--device")
    if args.quick:
        args.n, args.repeat = 256, 1
    sections = set(args.sections.split(","))
    if args.skip_logprobs:
        sections.discard("logprobs")
    if not sections <= {"logprobs", "hidden", "gae"}:
        raise SystemExit(f"--sections: unknown {sorted(sections - {'logprobs', 'hidden', 'gae'})}")

    bandwidth = copy_bandwidth(args.device)
    run = Provenance.start("kernels")
    info = dict(
        torch_threads=torch.get_num_threads(), device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        cpu_vector_bits=torch.ops.rlhf_engine.cpu_vector_bits(),
        build_info=torch.ops.rlhf_engine.build_info(),
        copy_bandwidth_gb_s=bandwidth / 1e9,
    )
    print(json.dumps(info, indent=1))
    print(f"{'op':<9}{'mode':<8}{'impl':<44}{'N/B':>6}{'V/T':>8} {'dtype':<9}{'median':>10}{'best':>10}"
          f"{'floor':>10}{'best/fl':>9}{'extra MB':>11}{'extra%':>9}{'work MB':>10}"
          + ("  h100 MODEL ms" if args.model else ""))
    rows = bench_logprobs(args, bandwidth) if "logprobs" in sections else []
    rows += bench_hidden(args, bandwidth) if "hidden" in sections else []
    rows += bench_gae(args) if "gae" in sections else []
    result = dict(info=info, rows=rows, speedups=_speedups(rows), hidden_ratios=_hidden_ratios(rows))
    print("speedups of rlhf_engine (best / median):")
    for s in result["speedups"]:
        print(f"  {s['op']} {s.get('mode', '')} {s.get('v', '')} {s.get('dtype', '')} vs {s['against']}: "
              f"{s['speedup_best']:.2f}x / {s['speedup_median']:.2f}x")
    if result["hidden_ratios"]:
        print("logprobs_from_hidden vs eager: time ours/theirs (median), peak extra theirs/ours, workspace theirs/ours:")
    for r in result["hidden_ratios"]:
        print(f"  {r['mode']:<8} N={r['n']} V={r['v']} {r['dtype']:<9} vs {r['against']:<38} "
              f"time {r['time_ours_over_theirs_median']:.2f}x  extra {r['peak_extra_theirs_over_ours']:.1f}x  "
              f"workspace {r['workspace_theirs_over_ours']:.1f}x")
    run.write(args.out or RESULTS / f"kernels_{args.device}_{run.date[:10]}.json", result)


if __name__ == "__main__":
    main()
