"""One PPO trainer step on real-shape models: tokens/s, peak memory and MFU, `logprobs_from_hidden` on and off.

The models are built from their configs on the device, with random weights (no weights travel):
  smollm2-135m   LlamaForCausalLM, SmolLM2-135M's shape: vocab 49152, hidden 576, 30 layers, 9 heads / 3 KV
                 heads, intermediate 1536, tied embeddings
  qwen2.5-0.5b   Qwen2ForCausalLM, Qwen2.5-0.5B's shape: vocab 151936, hidden 896, 24 layers, 14 heads / 2 KV
                 heads, intermediate 4864, tied embeddings
`--quick`: the same two architectures at toy size (a smoke run of every code path, not a speed figure).

Each (model, logprobs_from_hidden) case builds a fresh `PPOTrainer` (GAE, the policy with a value head and
a frozen reference copy) with every weight in `--dtype` (bf16: pure bf16 weights and AdamW states, no fp32
master copy), packed micro-batches of at most `--max-tokens` tokens, and runs `--warmup` + `--steps` steps on
the same batch: `--batch` samples of a `--prompt`-token query and a response of `--response` MIN,MAX tokens
(random tokens, no EOS). Per case, over the timed steps:
  tokens_per_s     real tokens (query + response) per second of `PPOTrainer.step`
  peak_mem_gib     cuda: torch.cuda.max_memory_allocated over the timed steps (reserved beside it);
                   cpu: the process's peak resident set (VmHWM, reset before the timed steps)
  model_tflop      matmul FLOPs of the step as the model defines them: the policy and reference forward
                   passes of the experience and `ppo_epochs` forward+backward passes of the update, each
                   2 x trunk matmul parameters per token + 2 x V x H per response token (the LM head runs only
                   at the positions that predict a response token) + causal attention 4 x L x H x S(S+1)/2 per
                   sequence of S tokens; the backward counts twice the forward. logprobs_from_hidden's extra
                   LM-head matmul in the backward is not model work and is not counted.
  mfu              model FLOPs per second over the bf16 (`--dtype`) matmul rate measured in this run
                   (8192^3 products, mean of 10 after 3 warm-ups; --quick: 512^3).
The JSON (`--out`) is rewritten after every case, so a run stopped by its time limit keeps the cases done.

    python benchmarks/gpu/trainer_step.py --device cuda --out trainer_step.json
    python benchmarks/gpu/trainer_step.py --device cpu --quick --out /tmp/trainer_step.json   # the dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's shape, the fields of its transformers config."""

    arch: str
    """`llama` or `qwen2`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True


MODELS = {
    "smollm2-135m": Shape("llama", 49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, 1, 2, 2),
    "qwen2.5-0.5b": Shape("qwen2", 151936, 896, 4864, 24, 14, 2, 1000000.0, 1e-6, 151643, 151645, 151643, 32768),
}
QUICK_MODELS = {  # the same architectures at toy size
    "smollm2-135m": Shape("llama", 512, 128, 256, 2, 2, 1, 100000.0, 1e-5, 1, 2, 2, 512),
    "qwen2.5-0.5b": Shape("qwen2", 1024, 128, 320, 2, 2, 1, 1000000.0, 1e-6, 1021, 1023, 1021, 512),
}


def build_model(shape: Shape, dtype: torch.dtype, device: str, seed: int):
    """A randomly initialised causal LM of `shape` with a value head, built on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        shape.arch]
    fields = {k: v for k, v in shape.__dict__.items() if k != "arch"}
    config = config_cls(**fields, head_dim=shape.hidden_size // shape.num_attention_heads)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLMWithValueHead(model_cls(config))
    return model.to(dtype)


def matmul_params(shape: Shape) -> tuple[int, int]:
    """(trunk matmul parameters, LM-head parameters) of `shape`: the weights every token multiplies."""
    h, hd = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    attn = h * hd * (shape.num_attention_heads * 2 + shape.num_key_value_heads * 2)  # q, o; k, v
    mlp = 3 * h * shape.intermediate_size  # gate, up, down
    return shape.num_hidden_layers * (attn + mlp), shape.vocab_size * h


def model_flops(shape: Shape, lengths: list[int], response_tokens: int, ppo_epochs: int) -> float:
    """Matmul FLOPs of one PPO step (see the module docstring): 2 forward passes + ppo_epochs x 3 forward."""
    trunk, head = matmul_params(shape)
    tokens = sum(lengths)
    attention = sum(4 * shape.num_hidden_layers * shape.hidden_size * s * (s + 1) / 2 for s in lengths)
    forward = 2 * trunk * tokens + 2 * head * response_tokens + attention
    return forward * (2 + 3 * ppo_epochs)


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the mean of 10 products after 3 warm-ups."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    _sync(device)  # forces a device sync: the products ran
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def _peak(device: str) -> dict[str, float]:
    if device == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"peak_mem_gib": hwm * 1024 / 2**30}


def make_batch(shape: Shape, args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`args.batch` random queries of `args.prompt` tokens and responses of args.response MIN..MAX tokens
    (spread evenly, shuffled), none of them an end-of-turn or pad token."""
    gen = torch.Generator().manual_seed(0)
    low, high = args.response
    lengths = torch.linspace(low, high, args.batch).round().long()[torch.randperm(args.batch, generator=gen)]
    special = torch.tensor([shape.bos_token_id, shape.eos_token_id, shape.pad_token_id])

    def tokens(n: int) -> torch.Tensor:
        t = torch.randint(4, shape.vocab_size, (n,), generator=gen)
        return torch.where(torch.isin(t, special), torch.full_like(t, 3), t)  # [n]

    return [tokens(args.prompt) for _ in range(args.batch)], [tokens(int(n)) for n in lengths]


def run_case(name: str, shape: Shape, from_hidden: bool, args: argparse.Namespace, rate: float) -> dict:
    from rlhf_engine import PPOConfig, PPOTrainer

    dtype = getattr(torch, args.dtype)
    queries, responses = make_batch(shape, args)
    cfg = PPOConfig(batch_size=args.batch, mini_batch_size=args.batch // args.minibatches, ppo_epochs=args.epochs,
                    learning_rate=1e-6, init_kl_coef=0.05, adap_kl_ctrl=False, packing=True,
                    max_tokens_per_microbatch=args.max_tokens, logprobs_from_hidden=from_hidden)
    model = build_model(shape, dtype, args.device, seed=0)
    trainer = PPOTrainer(cfg, model)  # pad and EOS ids from the model's config
    scores = torch.randn(args.batch, generator=torch.Generator().manual_seed(1))
    lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
    response_tokens = sum(len(r) for r in responses)
    flops = model_flops(shape, lengths, response_tokens, args.epochs)
    times, phases = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(args.device)
            _reset_peak(args.device)
        t0 = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        _sync(args.device)  # forces a device sync: the step's kernels finished
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            phases.append({k: v for k, v in stats.items() if k.startswith("time/ppo/")})
        print(f"  {name} from_hidden={from_hidden} step {i}: {time.perf_counter() - t0:.3f} s", flush=True)
    s = statistics.fmean(times)
    row = dict(model=name, logprobs_from_hidden=from_hidden, dtype=args.dtype, batch=args.batch,
               tokens_per_step=sum(lengths), response_tokens_per_step=response_tokens,
               max_tokens_per_microbatch=args.max_tokens, ppo_epochs=args.epochs, minibatches=args.minibatches,
               s_per_step=s, s_per_step_all=times, tokens_per_s=sum(lengths) / s,
               response_tokens_per_s=response_tokens / s, model_tflop=flops / 1e12,
               model_tflop_per_s=flops / s / 1e12, mfu=flops / s / rate,
               phases_s={k: statistics.fmean(p[k] for p in phases) for k in phases[0]},
               ppo_skipped=stats.get("ppo/skipped", 0.0), **_peak(args.device))
    del trainer, model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="toy shapes and batch: checks the script, not speed")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, help="samples per step (default 64; quick 4)")
    p.add_argument("--prompt", type=int, help="query tokens per sample (default 256; quick 8)")
    p.add_argument("--response", help="MIN,MAX response tokens (default 128,512; quick 4,12)")
    p.add_argument("--max-tokens", type=int, help="tokens per packed micro-batch (default 16384; quick 32)")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per step")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per epoch")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    p.add_argument("--steps", type=int, help="timed steps per case (default 3; quick 1)")
    p.add_argument("--out", type=Path, required=True, help="the JSON, rewritten after every case")
    args = p.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (4 if q else 64)
    args.prompt = args.prompt or (8 if q else 256)
    args.response = tuple(int(x) for x in (args.response or ("4,12" if q else "128,512")).split(","))
    args.max_tokens = args.max_tokens or (32 if q else 16384)
    args.steps = args.steps or (1 if q else 3)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; known: {', '.join(MODELS)}")
    if args.batch % args.minibatches:
        p.error(f"--batch ({args.batch}) must be divisible by --minibatches ({args.minibatches})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = QUICK_MODELS if args.quick else MODELS
    n = 512 if args.quick else 8192
    rate = matmul_rate(args.device, getattr(torch, args.dtype), n)
    out = dict(benchmark="trainer_step", device=args.device,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
               torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               quick=args.quick, argv=sys.argv[1:],
               matmul=dict(n=n, dtype=args.dtype, tflop_per_s=rate / 1e12),
               shapes={name: shapes[name].__dict__ for name in args.models.split(",")}, cases=[], errors=[])
    print(f"{args.dtype} matmul {n}^3: {rate / 1e12:.1f} TFLOP/s", flush=True)
    failed = False
    for name in args.models.split(","):
        for from_hidden in (False, True):
            try:
                row = run_case(name, shapes[name], from_hidden, args, rate)
            except Exception as exc:  # recorded as data; the next case still runs
                failed = True
                out["errors"].append(dict(model=name, logprobs_from_hidden=from_hidden, error=repr(exc),
                                          traceback=traceback.format_exc()[-3000:]))
                traceback.print_exc()
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            else:
                out["cases"].append(row)
                print(f"{name:<14} from_hidden={from_hidden!s:<5} {row['s_per_step']:.3f} s/step "
                      f"{row['tokens_per_s']:,.0f} tok/s  peak {row['peak_mem_gib']:.2f} GiB  "
                      f"MFU {100 * row['mfu']:.1f}%", flush=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
