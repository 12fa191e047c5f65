"""The config tree of a PPO run: one validated dataclass per YAML section.

```yaml
model:     {policy: out/sft, reward_model: out/rm}       # ModelConfig (+ lora: {r: 16} for LoRA)
data:      {prompts: prompts.jsonl}                      # DataConfig
ppo:       {batch_size: 16, mini_batch_size: 4, ...}     # PPOConfig (TRL names)
generator: {backend: vllm, sampling: {max_new_tokens: 32}}  # GeneratorConfig (model = model.policy)
transport: {endpoint: ipc:///tmp/run}                    # TransportConfig
engine:    {total_steps: 100, mode: async, max_staleness: 1}  # EngineConfig
```

`load_run_config("run.yaml", ["ppo.init_kl_coef=0.1"])` reads the file, applies `--set`
overrides and validates everything; errors name the key and the file. The same file configures
a generator started elsewhere (`rlhf-engine generator --config run.yaml --connect ...`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rlhf_engine.common.config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict, yaml_lines
from rlhf_engine.distributed.config import DistributedConfig
from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.rollout.config import GeneratorConfig
from rlhf_engine.telemetry.sinks import LOGGERS, LoggerName
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.transport.config import TransportConfig


@dataclass
class ModelConfig:
    """Where the four models come from: local HF folders (never looked up on a hub; `check_folders`)."""

    policy: str
    """The policy to train (usually the SFT output); also what the generators load."""
    ref_model: str | None = None
    """Frozen reference for the KL penalty; None = a frozen copy of the initial policy."""
    reward_model: str | None = None
    """An `AutoModelForSequenceClassification(num_labels=1)` folder (e.g. `rlhf-engine reward` output)."""
    reward_fn: str | None = None
    """Instead of a reward model: `module:function` with `fn(prompts, completions) -> scores`. One of the two is
    needed unless `generator.environment` rewards the episodes (it scores those its environment gave no
    reward)."""
    value_model: str | None = None
    """A separate critic folder; None = a value head on the policy."""
    gold_fn: str | None = None
    """Optional `module:function` scored on every batch and logged as `env/gold_mean`, never trained on
    (e.g. a task's true metric when the reward is a learned model)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen policy (`{r: 16, alpha: 32, target_modules: [q_proj, ...]}`, see
    `rlhf_engine.models.lora.LoraConfig`; needs `pip install 'rlhf-engine[lora]'`). Without `ref_model`, the
    reference is then the policy's base with its adapters disabled: no second copy of the weights. One trainer
    rank only."""

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("model.policy must name the policy's HF folder")
        if self.reward_model is not None and self.reward_fn is not None:
            raise ValueError(
                f"give one of model.reward_model ({self.reward_model!r}) and model.reward_fn ({self.reward_fn!r}), "
                "not both"
            )
        for name in ("reward_fn", "gold_fn"):
            spec = getattr(self, name)
            if spec is not None and (":" not in spec or not all(spec.split(":", 1))):
                raise ValueError(f"model.{name} ({spec!r}) must look like 'package.module:function'")
        if self.lora is not None and self.lora.critic and self.value_model is None:
            raise ValueError("model.lora.critic is true but model.value_model is not set: the value head on the "
                             "policy trains fully; give a separate critic to train it with LoRA")

    def check_folders(self) -> None:
        """`ConfigError` naming the first model folder that does not exist (checked when a run starts,
        so that a config may name folders an earlier stage still has to write)."""
        for name in ("policy", "ref_model", "reward_model", "value_model"):
            check_model_folder(getattr(self, name), f"model.{name}")


@dataclass
class DataConfig:
    """The prompts PPO samples from."""

    prompts: str
    """A JSONL/JSON file (or a folder `datasets` can load) of records with a `prompt` (string or chat
    `messages`) field."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are cut from the left (counted and reported)."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (deterministic in `ppo.seed`)."""
    eval_prompts: str | None = None
    """Held-out prompts in the same format (their other fields reach the reward functions too), evaluated
    through the generators at step 0, every `engine.eval_steps` steps and at the end (`eval/*` metrics)."""

    max_new_tokens_field: str | None = None
    """A record field holding each prompt's own response budget (an int >= 1; the generator also caps it at
    its `sampling.max_new_tokens`), sent with the prompt: per-prompt lengths, e.g. a long-tailed workload
    sampled with `ignore_eos`. Single-turn runs only (an environment's episode has one budget). None: every
    prompt gets the generator's."""

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) must be >= 1")


@dataclass
class EngineConfig:
    """How the run is driven: processes, async pipeline, checkpoints, logging."""

    run_dir: str = "runs/ppo"
    """Metrics, logs, timeline, checkpoints and plots go here."""
    total_steps: int = 100
    """PPO steps of the run."""
    mode: Literal["async", "sync"] = "async"
    """`async`: generators sample the next batches while the trainer updates (bounded by `max_staleness`);
    `sync`: each batch is sampled by the newest policy (the baseline)."""
    max_staleness: int = 1
    """Async only: most policy versions a sample may lag behind the policy that trains on it."""
    streaming: bool = False
    """Async only: each step trains on the first `prompts_per_step` prompts whose groups are complete, from
    whichever batch they were handed out in, instead of one batch handed out whole; a long answer no longer
    holds a step back. No prompt is dropped for being slow: a prompt handed out at policy version v is
    trained by version v + max_staleness at the latest (the step waits for its group then), which bounds
    every trained token's age. The trainer hands out `max_staleness` batches ahead (the batch pipeline:
    one more), which gives each prompt a step of slack; so streaming needs `max_staleness` >= 2."""
    num_generators: int = 1
    """Generator processes the engine starts."""
    external_generators: int = 0
    """Further generators started elsewhere (`rlhf-engine generator --connect`) that the engine waits for."""
    save_steps: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    trainer_threads: int | None = None
    """torch threads of the trainer (None: from the run's cpu plan, `rlhf_engine.engine.cpu_plan`)."""
    generator_threads: int | None = None
    """Threads of each generator process (None: from the run's cpu plan, `rlhf_engine.engine.cpu_plan`)."""
    generator_cpus: list[list[int]] | None = None
    """Pin generator i to these CPU ids (None: from the run's cpu plan: sync all cores, async a split)."""
    trainer_cpus: list[int] | None = None
    """Pin the trainer to these CPU ids (None: from the run's cpu plan)."""
    rollout_timeout_s: float = 600.0
    """Longest wait for a batch of rollouts before the run fails with an error naming the generators."""
    max_generator_restarts: int = 3
    """Local generator processes that exit are restarted, at most this many times within
    `restart_window_s` (all generators together); one more stops the run (with a checkpoint)."""
    restart_window_s: float = 3600.0
    """The window of `max_generator_restarts`."""
    reissue_timeout_s: float = 120.0
    """Prompts without a rollout within this many seconds of being handed out (a lost or stolen batch)
    or of their last rollout (a generator stuck half-way) are handed out again. Keep it above the time
    a batch may wait and take to generate, or work is done twice."""
    no_generator_timeout_s: float = 300.0
    """The run stops when no generator was connected (and no local one starting) for this long."""
    trainer_restarts: int = 0
    """Trainer ranks started by `--nproc N`: after a rank fails, the whole job starts again from the run's
    newest checkpoint, at most this many times (`save_steps` sets how much is run again)."""
    progress: bool = True
    """Show a progress bar."""
    loggers: list[LoggerName] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where step metrics go: `jsonl` (`run_dir/metrics.jsonl`, always written), `tensorboard`
    (`run_dir/tensorboard`, skipped when the package is missing), `wandb` (a Weights & Biases run with
    the config, metrics, timeline and plots; needs `pip install 'rlhf_engine[wandb]'`; set
    `WANDB_MODE=offline` to write it locally for a later `wandb sync`)."""
    eval_steps: int = 0
    """Evaluate `data.eval_prompts` at step 0, every this many steps and at the end (0: no evaluation). The
    trainer waits for it: each evaluation samples the current policy version, and is never trained on."""
    eval_samples: int = 1
    """Completions per evaluation prompt: the k of `eval/pass@k`."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation (0: greedy, then `eval_samples` must be 1)."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"engine.total_steps ({self.total_steps}) must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"engine.max_staleness ({self.max_staleness}) must be >= 0")
        if self.mode == "async" and self.max_staleness == 0:
            raise ValueError("engine.max_staleness = 0 is the sync pipeline: set engine.mode: sync")
        if self.streaming and self.mode != "async":
            raise ValueError("engine.streaming needs engine.mode: async (a sync step trains the one batch it sampled)")
        if self.streaming and self.max_staleness < 2:
            raise ValueError(f"engine.streaming needs max_staleness >= 2 (got {self.max_staleness}): it hands out "
                             "max_staleness batches ahead, and one batch at a time leaves the generators idle while "
                             "the trainer trains")
        if self.num_generators < 0 or self.external_generators < 0 or self.num_generators + self.external_generators < 1:
            raise ValueError(
                f"need at least one generator: num_generators={self.num_generators}, "
                f"external_generators={self.external_generators}"
            )
        if self.save_steps < 0 or self.keep_last < 1:
            raise ValueError(f"engine.save_steps ({self.save_steps}) must be >= 0 and keep_last ({self.keep_last}) >= 1")
        if self.generator_cpus is not None and len(self.generator_cpus) != self.num_generators:
            raise ValueError(
                f"engine.generator_cpus has {len(self.generator_cpus)} entries for {self.num_generators} generators"
            )
        for name in ("rollout_timeout_s", "restart_window_s", "reissue_timeout_s", "no_generator_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"engine.{name} ({getattr(self, name)}) must be > 0")
        if self.trainer_restarts < 0:
            raise ValueError(f"engine.trainer_restarts ({self.trainer_restarts}) must be >= 0")
        if self.max_generator_restarts < 0:
            raise ValueError(f"engine.max_generator_restarts ({self.max_generator_restarts}) must be >= 0")
        if self.eval_steps < 0 or self.eval_samples < 1:
            raise ValueError(f"engine.eval_steps ({self.eval_steps}) must be >= 0 and engine.eval_samples "
                             f"({self.eval_samples}) >= 1")
        if not 0 <= self.eval_temperature < float("inf"):
            raise ValueError(f"engine.eval_temperature ({self.eval_temperature}) must be finite and >= 0")
        if self.eval_temperature == 0 and self.eval_samples > 1:
            raise ValueError(f"engine.eval_samples ({self.eval_samples}) > 1 at engine.eval_temperature 0 gives "
                             f"{self.eval_samples} identical greedy completions: sample with a temperature > 0")
        unknown = [n for n in self.loggers if n not in LOGGERS]
        if unknown or len(set(self.loggers)) != len(self.loggers):
            raise ValueError(f"engine.loggers ({self.loggers}) must name each of {list(LOGGERS)} at most once")
        if "jsonl" not in self.loggers:
            self.loggers = ["jsonl", *self.loggers]

    @property
    def batches_in_flight(self) -> int:
        """Prompt batches handed out ahead of the trainer: 1 in sync mode, 1 + max_staleness in async,
        max_staleness when streaming (see `streaming`)."""
        if self.mode == "sync":
            return 1
        return self.max_staleness if self.streaming else 1 + self.max_staleness


@dataclass
class RunConfig:
    """A whole PPO run."""

    model: ModelConfig
    data: DataConfig
    ppo: PPOConfig = field(default_factory=PPOConfig)
    generator: GeneratorConfig | None = None
    """Backend and sampling; `model` defaults to `model.policy`, sampling defaults follow `ppo`."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: DistributedConfig = field(default_factory=DistributedConfig)
    """The trainer's ranks when launched with `--nproc N` or torchrun: backend, FSDP2 or replicated, sharded
    frozen models, mixed precision, activation checkpointing."""

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = GeneratorConfig(model=self.model.policy)
        gen, ppo = self.generator, self.ppo
        if self.model.reward_model is None and self.model.reward_fn is None and gen.environment.single_turn:
            raise ValueError("give model.reward_model or model.reward_fn (or a generator.environment that rewards "
                             "its episodes)")
        if Path(gen.model).resolve() != Path(self.model.policy).resolve():
            raise ValueError(f"generator.model ({gen.model!r}) must be model.policy ({self.model.policy!r})")
        # the trainer recomputes log-probs under the sampler's distribution: the two must agree
        if gen.sampling.temperature != ppo.temperature:
            raise ValueError(
                f"generator.sampling.temperature ({gen.sampling.temperature}) must equal ppo.temperature ({ppo.temperature})"
            )
        if gen.sampling.top_p != 1.0 or gen.sampling.top_k != 0:
            raise ValueError(
                "generator.sampling.top_p/top_k must stay 1.0/0 for PPO: the trainer's log-probs are those of the "
                f"full softmax (got top_p={gen.sampling.top_p}, top_k={gen.sampling.top_k})"
            )
        if gen.sampling.max_new_tokens != ppo.response_length:
            raise ValueError(
                f"generator.sampling.max_new_tokens ({gen.sampling.max_new_tokens}) must equal "
                f"ppo.response_length ({ppo.response_length})"
            )
        if self.data.max_new_tokens_field is not None and not gen.environment.single_turn:
            raise ValueError(f"data.max_new_tokens_field ({self.data.max_new_tokens_field!r}) gives single-turn "
                             f"prompts a budget; the environment {gen.environment.name!r} has one per episode")
        if gen.sampling.n != ppo.num_generations:
            raise ValueError(f"generator.sampling.n ({gen.sampling.n}) must equal ppo.num_generations ({ppo.num_generations})")
        if ppo.batch_size % gen.sampling.n:
            raise ValueError(f"ppo.batch_size ({ppo.batch_size}) must be divisible by generator.sampling.n ({gen.sampling.n})")
        # a prompt and its response must fit the model and the generator's sequence length
        longest = self.data.max_prompt_length + ppo.response_length
        positions = max_positions(self.model.policy)
        for limit, name in ((positions, "the policy's max_position_embeddings"), (gen.max_model_len, "generator.max_model_len")):
            if limit is not None and longest > limit:
                raise ValueError(f"data.max_prompt_length ({self.data.max_prompt_length}) + ppo.response_length "
                                 f"({ppo.response_length}) = {longest} exceeds {name} ({limit})")
        if (self.data.eval_prompts is None) != (self.engine.eval_steps == 0):
            raise ValueError(f"data.eval_prompts ({self.data.eval_prompts!r}) and engine.eval_steps "
                             f"({self.engine.eval_steps}) go together: give both to evaluate, or neither")
        # the wire carries nothing longer than the run can produce (the generators read the same config)
        self.transport.max_prompt_tokens = self.data.max_prompt_length
        self.transport.max_response_tokens = ppo.response_length
        self.transport.max_batch_prompts = self.prompts_per_step

    @property
    def prompts_per_step(self) -> int:
        return self.ppo.batch_size // self.generator.sampling.n


def load_run_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> RunConfig:
    """Read `path` (YAML; or start from `base`), apply `--set` overrides, validate.

    Sampling settings that must agree with PPO (`max_new_tokens`, `temperature`, `n`) default to
    the `ppo` section's values when the `generator` section leaves them out; `generator.environment` may be
    given as its import path alone.
    """
    source = str(path) if path is not None else "<config>"
    data = load_yaml(path) if path is not None else dict(base or {})
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{source} (with --set)"
    for section in ("model", "data"):
        if section not in data:
            raise ConfigError(f"{source}: missing section {section!r}")
    data = _fill_generator_defaults(data)
    return from_dict(RunConfig, data, source=source, lines=yaml_lines(path) if path is not None else None)


def _fill_generator_defaults(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    ppo = dict(data.get("ppo") or {})
    gen = dict(data.get("generator") or {})
    model = data.get("model")
    if isinstance(model, dict) and "policy" in model:
        gen.setdefault("model", model["policy"])
    sampling = dict(gen.get("sampling") or {})
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    sampling.setdefault("max_new_tokens", ppo.get("response_length", defaults["response_length"]))
    sampling.setdefault("temperature", ppo.get("temperature", defaults["temperature"]))
    sampling.setdefault("n", ppo.get("num_generations", defaults["num_generations"]))
    gen["sampling"] = sampling
    if isinstance(gen.get("environment"), str):  # `environment: package.module:Class`
        gen["environment"] = {"name": gen["environment"]}
    data["generator"] = gen
    return data


def save_run_config(config: RunConfig, path: str | Path) -> None:
    """Write `config` as YAML that `load_run_config` reads back to an equal config."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def check_model_folder(path: str | None, field: str) -> None:
    """`ConfigError("FIELD: no such model folder: PATH")` unless `path` (if given) is a folder: models
    are local HF folders, never looked up on a hub."""
    if path is not None and not os.path.isdir(os.path.expanduser(path)):
        if str(path).endswith(".gguf") and os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"{field}: {path} is a GGUF file, not a model folder: convert it once with "
                              f"`rlhf-engine convert-gguf {path} OUT` and name OUT")
        raise ConfigError(f"{field}: no such model folder: {path}")


def max_positions(model_dir: str) -> int | None:
    """`max_position_embeddings` (or `n_positions`) of the HF config in `model_dir`, None if it has none."""
    path = Path(os.path.expanduser(model_dir)) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable model config: {e}") from e
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return text.get("max_position_embeddings") if isinstance(text, dict) else None


def import_function(spec: str) -> Callable:
    """The function named by `module:function` (a user's reward or gold function)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import module {module_name!r} of {spec!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{spec!r}: module {module_name!r} has no function {attr!r}")
    return fn
