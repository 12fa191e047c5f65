"""What every variant of the end-to-end benchmark runs: one model, one prompt set, one PPO
shape; and how a variant (sync / async, staleness, generators, pinning) turns that into the
engine's config tree.

The default model is a ~38 M-parameter Llama (vocab 4096, hidden 512, 8 layers, 8 heads,
intermediate 2048) built from scratch: below that size vLLM's per-call overhead dominates on
a CPU (../shared/FACTS.md). Two tasks:

- `sentiment` (the default, for throughput): the demo's task: prompts are sentence starts, the reward (and gold
  score) is #positive − #negative words of the completion; completions are `response_length` tokens long
  (eos ignored), so every step has the same work;
- `arithmetic` (for accuracy, with a real instruct model): the SmolLM2 recipe's chat prompts and rewards
  (`examples/smollm2_arithmetic`): completions end at the model's end of turn, and each trained policy is
  evaluated on the recipe's held-out sums (greedy, strict `#### N` accuracy) by one evaluator for every side.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("sync", "async")
SETTINGS = ("pinned", "unpinned")
TASKS = ("sentiment", "arithmetic")
REWARD_FN = "rlhf_engine.demo:gold_scores"
ARITHMETIC_DIR = Path(__file__).resolve().parents[2] / "examples" / "smollm2_arithmetic"
"""The recipe whose data (`make_data.py`) and rewards (`arith_reward.py`) the arithmetic task uses."""


@dataclass(frozen=True)
class ModelShape:
    """Shape of the Llama the benchmark builds (head_dim = hidden / heads must be 64 for vLLM-CPU)."""

    vocab_size: int = 4096
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 1024
    """Room for the longest scaling point (512 generated tokens after the prompt)."""


BENCH_MODEL = ModelShape()
QUICK_MODEL = ModelShape(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)


@dataclass(frozen=True)
class Workload:
    """The work of one run: identical for every variant compared with each other."""

    model: str
    """HF folder of the policy (and reference, and generator)."""
    prompts: str
    """JSONL file of `{"prompt": ...}` records (and the fields the reward functions take)."""
    task: str = "sentiment"
    """What `prompts` ask: `sentiment` or `arithmetic` (see the module's text)."""
    reward_fn: str = REWARD_FN
    gold_fn: str = REWARD_FN
    """`module:function`s of the reward and of the gold score (TRL's run is rewarded by `reward_fn` too)."""
    python_path: str | None = None
    """A folder the reward functions' module is imported from (the children's PYTHONPATH)."""
    eval_prompts: str | None = None
    """Held-out prompts: each side's trained policy is saved after `steps` and evaluated on them; None: not."""
    ignore_eos: bool = True
    """Completions run `response_length` tokens past eos (TRL: `min_new_tokens`); False: they end at eos."""
    temperature: float = 1.0
    """Sampling temperature (both sides score at it too)."""
    batch_size: int = 16
    """Samples per PPO step (prompts per step x num_generations)."""
    num_generations: int = 4
    """Completions per prompt (the group of GRPO)."""
    response_length: int = 32
    """Generated tokens per completion (the most, when eos ends them)."""
    steps: int = 5
    """PPO steps per variant."""
    warmup_steps: int = 1
    """Leading steps left out of the steady-state numbers (first vLLM call, pipeline fill)."""
    ppo_epochs: int = 1
    """Passes over the batch per step (one optimizer step each: mini_batch_size = batch_size)."""
    learning_rate: float = 1e-4
    kl_coef: float = 0.05
    """Fixed KL coefficient (ours: reward penalty; TRL: `beta`)."""
    backend: str = "vllm"
    """Generator backend of our engine: vllm or transformers."""
    max_prompt_length: int = 32
    bf16: bool = False
    """Both sides in bf16: ours `ppo.bf16` and the generator's vLLM in bf16 (`generator.dtype`), TRL's `bf16`
    (autocast over its training and generation); fp32 otherwise."""
    logprobs_from_hidden: bool = False
    """Our `ppo.logprobs_from_hidden` (TRL has no such option)."""
    kv_cache_bytes: int = 1 << 28
    """vLLM's KV cache (256 MiB holds the default workload; raise it for a real model)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by num_generations "
                             f"({self.num_generations})")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in [0, steps ({self.steps}))")
        if self.task not in TASKS:
            raise ValueError(f"task ({self.task!r}) must be one of {TASKS}")
        if self.backend not in ("vllm", "transformers"):
            raise ValueError(f"backend ({self.backend!r}) must be vllm or transformers")

    @property
    def max_model_len(self) -> int:
        """The generator's `max_model_len`: the longest prompt, the longest response and a margin."""
        return self.max_prompt_length + self.response_length + 16

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.response_length


@dataclass(frozen=True)
class Variant:
    """How the engine runs the workload."""

    mode: str = "sync"
    max_staleness: int = 1
    """Async only (sync runs are reported with 0)."""
    num_generators: int = 1
    setting: str = "pinned"
    """`pinned`: generator(s) and trainer each on their own cores, 1 thread each (isolates the
    overlap); `unpinned`: no pinning, every process uses all cores (what a user runs for sync)."""
    estimator: str = "gae"
    """PPO advantage estimator (`gae`: 4 models with a value head; `grpo` for the TRL comparison)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode ({self.mode!r}) must be one of {MODES}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting ({self.setting!r}) must be one of {SETTINGS}")
        if self.mode == "async" and self.max_staleness < 1:
            raise ValueError(f"async needs max_staleness >= 1, got {self.max_staleness}")
        if self.num_generators < 1:
            raise ValueError(f"num_generators ({self.num_generators}) must be >= 1")

    @property
    def name(self) -> str:
        """E.g. `pinned/sync`, `unpinned/async-s2-g2`, `unpinned/async-s1-grpo`."""
        name = f"{self.setting}/{'sync' if self.mode == 'sync' else f'async-s{self.max_staleness}'}"
        if self.num_generators > 1:
            name += f"-g{self.num_generators}"
        if self.estimator != "gae":
            name += f"-{self.estimator}"
        return name

    @property
    def lookahead(self) -> int:
        """Batches the engine hands out beyond the current step: max_staleness in async, 0 in sync (at least 1
        here: a run stopped before total_steps writes no final checkpoint)."""
        return self.max_staleness if self.mode == "async" else 1

    def fits(self, cpus: int) -> bool:
        """Pinned runs need a core per generator plus one for the trainer."""
        return self.setting == "unpinned" or self.num_generators + 1 <= cpus


def parse_variant(name: str) -> Variant:
    """The inverse of `Variant.name`: `pinned/async-s1`, `unpinned/sync-grpo`, `unpinned/async-s1-g2`."""
    setting, _, rest = name.partition("/")
    parts = rest.split("-")
    if setting not in SETTINGS or not parts[0]:
        raise ValueError(f"variant {name!r}: expected SETTING/MODE[-sN][-gN][-grpo], SETTING in {SETTINGS}")
    fields: dict[str, Any] = {"setting": setting, "mode": parts[0]}
    for part in parts[1:]:
        if part[:1] == "s" and part[1:].isdigit():
            fields["max_staleness"] = int(part[1:])
        elif part[:1] == "g" and part[1:].isdigit():
            fields["num_generators"] = int(part[1:])
        elif part in ("grpo", "rloo", "reinforce_pp"):
            fields["estimator"] = part
        else:
            raise ValueError(f"variant {name!r}: unknown part {part!r}")
    variant = Variant(**fields)
    if variant.name != name:
        raise ValueError(f"variant {name!r} is not in canonical form; write {variant.name!r}")
    return variant


def cpu_plan(variant: Variant, cpus: list[int]) -> dict[str, Any]:
    """Engine fields for pinning and threads: pinned puts the trainer on the last core and generator
    i on core i with one thread each; unpinned gives every process all cores (the vLLM worker bound to
    all of them, see `rlhf_engine.engine.cpu_plan`: the plan of a sync run)."""
    if variant.setting == "unpinned":
        return {"trainer_threads": len(cpus), "trainer_cpus": cpus, "generator_threads": len(cpus),
                "generator_cpus": [cpus] * variant.num_generators}
    if not variant.fits(len(cpus)):
        raise ValueError(f"{variant.name}: {variant.num_generators} pinned generators + a trainer need "
                         f"{variant.num_generators + 1} cores; this machine has {len(cpus)}")
    return {"trainer_threads": 1, "trainer_cpus": [cpus[-1]], "generator_threads": 1,
            "generator_cpus": [[cpus[i]] for i in range(variant.num_generators)]}


def run_config(workload: Workload, variant: Variant, run_dir: Path, cpus: list[int]) -> dict[str, Any]:
    """The `load_run_config(None, base=...)` tree of one variant."""
    wl = workload
    return {
        "model": {"policy": wl.model, "reward_fn": wl.reward_fn, "gold_fn": wl.gold_fn},
        "data": {"prompts": wl.prompts, "max_prompt_length": wl.max_prompt_length},
        "ppo": {"batch_size": wl.batch_size, "mini_batch_size": wl.batch_size, "ppo_epochs": wl.ppo_epochs,
                "learning_rate": wl.learning_rate, "init_kl_coef": wl.kl_coef, "adap_kl_ctrl": False,
                "response_length": wl.response_length, "num_generations": wl.num_generations,
                "advantage_estimator": variant.estimator, "seed": wl.seed, "temperature": wl.temperature,
                "bf16": wl.bf16, "logprobs_from_hidden": wl.logprobs_from_hidden,
                # the critic-free estimators as TRL's GRPOTrainer runs them: beta * KL (k3) in the loss
                **({"kl_in_reward": False, "kl_penalty": "k3"} if variant.estimator != "gae" else {})},
        "generator": {"backend": wl.backend, "max_model_len": wl.max_model_len, "kv_cache_bytes": wl.kv_cache_bytes,
                      "dtype": "bfloat16" if wl.bf16 else "float32",
                      "device": "cpu", "max_batch_size": wl.batch_size, "sampling": {"ignore_eos": wl.ignore_eos, "temperature": wl.temperature}},
        "transport": {"endpoint": f"ipc://{run_dir.resolve()}/ep"},
        # run_variant stops after wl.steps of total_steps, as a longer run would look at that point: the
        # generator already works on the batches ahead (async), and no final checkpoint (~0.5 GB at 38 M
        # parameters with the optimizer) is written inside the measurement
        "engine": {"run_dir": str(run_dir), "total_steps": wl.steps + variant.lookahead, "mode": variant.mode,
                   "max_staleness": variant.max_staleness if variant.mode == "async" else 1,
                   "num_generators": variant.num_generators, "progress": False, "loggers": ["jsonl"],
                   "rollout_timeout_s": 900.0, **cpu_plan(variant, cpus)},
    }


def available_cpus() -> list[int]:
    """CPU ids this process may run on."""
    return sorted(os.sched_getaffinity(0))


def build_model(path: Path, shape: ModelShape) -> Path:
    """Tokenizer + randomly initialised Llama of `shape` in `path` (reused when already there)."""
    from rlhf_engine.models.tiny import TinyLlamaSpec, make_tiny_model_dir

    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    spec = TinyLlamaSpec(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                         num_heads=shape.num_heads, intermediate_size=shape.intermediate_size,
                         max_position_embeddings=shape.max_position_embeddings)
    return make_tiny_model_dir(path, spec)


def write_prompts(path: Path, n: int = 256, seed: int = 0) -> Path:
    """`n` prompts of the demo's sentiment task as JSONL."""
    from rlhf_engine.data import synthetic

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(n, seed=seed)))
    return path


def arithmetic_task(folder: Path) -> dict[str, Any]:
    """The `Workload` fields of the arithmetic task, its data written into `folder` by the recipe's
    `make_data.py`: its train and held-out prompts, its reward (right sum as `#### N` + the format) and strict
    accuracy as the gold score, completions ending at end of turn, temperature 0.7 (the recipe's)."""
    spec = importlib.util.spec_from_file_location("smollm2_arithmetic_data", ARITHMETIC_DIR / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    paths = make_data.write(folder)
    return {"task": "arithmetic", "prompts": str(paths["train"]), "eval_prompts": str(paths["eval"]),
            "reward_fn": "arith_reward:reward", "gold_fn": "arith_reward:accuracy",
            "python_path": str(ARITHMETIC_DIR), "ignore_eos": False, "temperature": 0.7, "max_prompt_length": 96}
