"""What the SFT, reward and DPO stages share: the base config, optimizer and LR schedule, the
optimizer-step loop with gradient accumulation, evaluation cadence, HF-folder checkpoints, and the
`StageTrainer` base class (`train` and `save`)."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from rlhf_engine.common.dtypes import autocast, warn_if_bf16_is_emulated
from rlhf_engine.data.records import DataStats
from rlhf_engine.models.lora import LoraConfig, apply_lora, is_lora
from rlhf_engine.telemetry.metrics import MetricsLogger
from rlhf_engine.trainer.export import save_stage_folder
from rlhf_engine.trainer.optim import adamw
from rlhf_engine.trainer.schedule import lr_scheduler

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class StageConfig:
    """Fields shared by `SFTConfig`, `RewardConfig` and `DPOConfig` (names as in TRL / transformers)."""

    model_name_or_path: str = ""
    """Local Hugging Face folder of the model to start from (not needed when a model object is passed)."""
    train_file: str = ""
    """Training data: a .jsonl/.json file (other formats through `datasets`); not needed when a dataset is passed."""
    eval_file: str = ""
    """Evaluation data in the same format; empty: hold out `eval_split` of the training data instead."""
    eval_split: float = 0.0
    """Fraction of the training examples held out for evaluation when there is no `eval_file` (0: no eval)."""
    output_dir: str = "runs/stage"
    """Where the final model (an HF folder), `checkpoint-<step>` folders and `metrics.jsonl` go."""
    per_device_train_batch_size: int = 8
    """Examples (or pairs, or packed rows) per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Examples per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_train_epochs: int = 1
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Total optimizer steps; > 0 overrides `num_train_epochs` (the data is cycled)."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to 0, cosine to 0, or constant."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps (used when `warmup_steps` is 0)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to `learning_rate`."""
    logging_steps: int = 10
    """Write training metrics every this many optimizer steps."""
    eval_steps: int = 0
    """Evaluate before the first step (step 0), every this many optimizer steps and at the end (0: only at the
    end)."""
    save_steps: int = 0
    """Save `checkpoint-<step>` every this many optimizer steps (0: only the final model)."""
    max_length: int | None = 1024
    """Longest tokenized sequence; longer ones are cut on the right and counted (None: no limit)."""
    skip_invalid: bool = False
    """Skip bad records (counted and reported) instead of raising an error that names file, line and field."""
    seed: int = 42
    """Seed for initialisation, shuffling and the eval split."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    bf16: bool = False
    """Mixed precision: the model's forward passes (the DPO reference's too) run under `torch.autocast` in
    bfloat16 on the stage's device; weights, gradients, optimizer state and the saved model stay fp32, and the
    losses are computed in fp32 from the bf16 outputs. On a CPU without AVX-512 BF16 or AMX torch emulates bf16,
    slower than fp32 (a warning says so)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen model (`{r: 16, alpha: 32, target_modules: [q_proj, ...]}`, see
    `rlhf_engine.models.lora.LoraConfig`; a reward model's score head trains fully). The saved folder is then
    the merged model (an HF folder, as without LoRA) plus the adapters alone in its `adapter/` (PEFT format).
    Needs `pip install 'rlhf-engine[lora]'`."""

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("eval_steps", "save_steps", "warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps ({self.max_steps}) must be -1 (use num_train_epochs) or > 0")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio ({self.warmup_ratio}) must be in [0, 1)")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split ({self.eval_split}) must be in [0, 1)")
        if self.eval_file and self.eval_split:
            raise ValueError(f"give eval_file ({self.eval_file!r}) or eval_split ({self.eval_split}), not both")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length ({self.max_length}) must be >= 2 or None")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_scheduler_type ({self.lr_scheduler_type!r}) must be linear, cosine or constant")
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(path: str | Path):
    """`AutoTokenizer` from `path`, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def report_data(stats: DataStats) -> None:
    """Log what loading did to a dataset: a warning when anything was skipped, cut or dropped."""
    lossy = stats.skipped or stats.truncated or stats.dropped_empty
    log.log(logging.WARNING if lossy else logging.INFO, "data %s", stats.summary())


def split_eval(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle `examples` (seeded) and hold out `round(fraction * n)` of them (at least 1 when fraction > 0)."""
    if not fraction:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise ValueError(f"eval_split ({fraction}) leaves no training example out of {len(examples)}")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def train_eval_datasets(config: StageConfig, tokenizer, build: Callable[..., tuple[list[T], DataStats]],
                        train_dataset: Any, eval_dataset: Any) -> tuple[list[T], list[T], list[DataStats]]:
    """Tokenized train and eval examples of a stage, and their data counts (each reported).

    `build(source, tokenizer, max_length=, skip_invalid=, name=)` tokenizes one source
    (`build_sft_dataset` or `build_preference_dataset`). The train source is `train_dataset`, else
    `config.train_file`; eval is `eval_dataset`, else `config.eval_file`, else `eval_split` of train.
    """
    source = train_dataset if train_dataset is not None else config.train_file
    if source is None or (isinstance(source, str) and not source):
        raise ValueError(f"{type(config).__name__}.train_file is empty and no train_dataset was passed")
    train, train_stats = build(source, tokenizer, max_length=config.max_length,
                               skip_invalid=config.skip_invalid, name="train")
    stats = [train_stats]
    eval_source = eval_dataset if eval_dataset is not None else (config.eval_file or None)
    if eval_source is not None:
        evals, eval_stats = build(eval_source, tokenizer, max_length=config.max_length,
                                  skip_invalid=config.skip_invalid, name="eval")
        stats.append(eval_stats)
    else:
        train, evals = split_eval(train, config.eval_split, config.seed)
    for s in stats:
        report_data(s)
    return train, evals, stats


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def build_optimizer(model: torch.nn.Module, config: StageConfig, total_steps: int):
    """AdamW over the trainable parameters and its LambdaLR schedule for `total_steps` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                      eps=config.adam_epsilon, weight_decay=config.weight_decay)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    scheduler = lr_scheduler(optimizer, config.lr_scheduler_type, warmup, total_steps)
    return optimizer, scheduler


StepFn = Callable[[list[Any]], dict[str, float]]
"""step_fn(micro_batches) -> metrics: forward + backward over one optimizer step's micro-batches."""


def run_training(config: StageConfig, model: torch.nn.Module, epoch_batches: Callable[[int], list[Any]],
                 step_fn: StepFn, evaluate: Callable[[], dict[str, float]] | None,
                 save: Callable[[Path], None]) -> list[dict[str, float]]:
    """The optimizer-step loop every stage uses; returns the log history (one dict per logged
    training window or evaluation, each with its `step`), also written to `output_dir/metrics.jsonl`.

    `epoch_batches(epoch)` gives the epoch's micro-batches (already shuffled); each optimizer step
    takes `gradient_accumulation_steps` of them (the last step of an epoch may take fewer).
    """
    accum = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(epoch_batches(0)) / accum)
    total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_train_epochs
    optimizer, scheduler = build_optimizer(model, config, total)
    logger = MetricsLogger(config.output_dir, progress=False)
    history: list[dict[str, float]] = []

    def log(step: int, metrics: dict[str, float]) -> None:
        logger.log(step, metrics)
        history.append({"step": step, **metrics})

    window: list[dict[str, float]] = []
    step, epoch = 0, 0
    try:
        if evaluate is not None and config.eval_steps:  # the starting point, as the PPO engine's step 0
            log(0, evaluate())
        while step < total:
            for group in chunks(epoch_batches(epoch), accum):
                if step >= total:
                    break
                model.train()
                metrics = step_fn(group)
                if config.max_grad_norm:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    metrics["grad_norm"] = float(norm)  # device sync
                metrics["learning_rate"] = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append(metrics)
                if step % config.logging_steps == 0 or step == total:
                    log(step, {"epoch": epoch, **{f"train/{k}": sum(m[k] for m in window) / len(window)
                                                  for k in window[0]}})
                    window = []
                if evaluate is not None and config.eval_steps and step % config.eval_steps == 0 and step < total:
                    log(step, evaluate())
                if config.save_steps and step % config.save_steps == 0 and step < total:
                    save(Path(config.output_dir) / f"checkpoint-{step}")
            epoch += 1
        if evaluate is not None:
            log(step, evaluate())
    finally:
        logger.close()
    return history


def train_stage(config: StageConfig, model: torch.nn.Module, epoch_batches: Callable[[int], list[Any]],
                step_fn: StepFn, evaluate: Callable[[], dict[str, float]] | None,
                save: Callable[[Path | None], Path], data_stats: Sequence[DataStats]
                ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """`run_training`, then the final save to `output_dir` (`save(None)`); returns the log history and
    the final metrics (`summarize`, plus the data counts as `data/<name>/*`)."""
    history = run_training(config, model, epoch_batches, step_fn, evaluate, save)
    save(None)
    out = summarize(history)
    for stats in data_stats:
        out.update(stats.as_metrics(f"data/{stats.name}"))
    return history, out


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Final metrics of a run: the last value of every logged key, plus `train/first_loss` (the first
    logged training loss, to compare with `train/loss`)."""
    out: dict[str, float] = {}
    for record in history:
        out.update(record)
    first = next((r["train/loss"] for r in history if "train/loss" in r), None)
    if first is not None:
        out["train/first_loss"] = first
    return out


class StageTrainer:
    """What `SFTTrainer`, `RewardTrainer` and `DPOTrainer` share: `train()` and `save()`.

    A subclass sets `config`, `model`, `tokenizer`, `data_stats`, `train_data` and `eval_data` (its
    tokenized examples or pairs) and defines `_batches(data, batch_size, shuffle_seed)`, `_step(group)`
    and `evaluate()`.
    """

    config: StageConfig
    model: torch.nn.Module
    tokenizer: Any
    data_stats: list[DataStats]
    train_data: list[Any]
    eval_data: list[Any]
    log_history: list[dict[str, float]]

    def _setup(self, config: StageConfig, model: torch.nn.Module | None, tokenizer: Any,
               load_model: Callable[[str, Any], torch.nn.Module], build: Callable[..., tuple[list[T], DataStats]],
               train_dataset: Any, eval_dataset: Any) -> None:
        """The start of every stage: seed, device, tokenizer and model (`load_model(path, tokenizer)` from
        `config.model_name_or_path` when not given; with `config.lora`, LoRA adapters on it), then the
        tokenized data (see `train_eval_datasets`)."""
        self.config = config
        seed_everything(config.seed)  # a fresh head of a loaded model (the reward model's score) is random
        self.device = resolve_device(config.device)
        if config.bf16:
            warn_if_bf16_is_emulated(f"{type(config).__name__}.bf16", self.device)
        if (tokenizer is None or model is None) and not config.model_name_or_path:
            raise ValueError(f"{type(config).__name__}.model_name_or_path is empty and no model/tokenizer was passed")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_name_or_path)
        model = model if model is not None else load_model(config.model_name_or_path, self.tokenizer)
        if config.lora is not None and not is_lora(model):
            model = apply_lora(model, config.lora)
        self.model = model.to(self.device)
        self.train_data, self.eval_data, self.data_stats = train_eval_datasets(
            config, self.tokenizer, build, train_dataset, eval_dataset)
        self.log_history = []

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The context of every forward pass: `torch.autocast` in bfloat16 on the stage's device with
        `config.bf16`, else nothing."""
        return autocast(self.device.type, torch.bfloat16 if self.config.bf16 else None)

    def train(self) -> dict[str, float]:
        """Run the configured steps, save the model to `output_dir`, return the final metrics
        (`train/loss`, `train/first_loss`, the eval metrics, data counts, ...)."""
        c = self.config
        self.log_history, out = train_stage(
            c, self.model,
            epoch_batches=lambda epoch: self._batches(self.train_data, c.per_device_train_batch_size, c.seed + epoch),
            step_fn=self._step, evaluate=self.evaluate if self.eval_data else None, save=self.save,
            data_stats=self.data_stats)
        return out

    def save(self, path: str | Path | None = None) -> Path:
        """Write the model and tokenizer as an HF folder (default: `output_dir`); returns the folder."""
        target = Path(path) if path is not None else Path(self.config.output_dir)
        return save_stage_folder(self.model, self.tokenizer, target, atomic=path is not None)


def load_causal_lm(path: str, tokenizer: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM` from the HF folder `path` (the `load_model` of SFT and DPO)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
