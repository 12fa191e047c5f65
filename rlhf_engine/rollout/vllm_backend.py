"""`VLLMGenerator`: rollouts from a `vllm.LLM` engine whose weights are replaced in place.

- Sampling: one `SamplingParams` per prompt (its own seed), `logprobs=0` and
  `logprobs_mode="processed_logprobs"`, so each token's log-prob is the one of the
  distribution the sampler drew from (after temperature, top-k, top-p).
- Weight updates: loaded by `model_runner.reload_weights` (`WeightReloadExtension`): with the engine in
  this process straight from the received tensors (`rlhf_load_weights`); with the engine in its own
  process copied once into a shared-memory staging file it maps (`rlhf_reload_weights`). The prefix
  cache is reset afterwards, since cached KV blocks came from the old weights.
- Adapter updates (`config.lora`, `model.lora.sync: adapters`): the engine runs with
  `enable_lora` (`max_lora_rank` the smallest rank vLLM accepts >= r, `max_loras` 1) on the
  frozen base, and every `generate` passes the current version's `LoRARequest`. Each version is
  loaded as a NEW adapter (`vllm_adapters.AdapterSlot`: a PEFT folder in the staging folder,
  `add_lora` with a fresh id and the name `policy-v<version>`, then `remove_lora` of the previous
  one). vLLM 0.32 can also replace an adapter in place (`LoRARequest(load_inplace=True)` with the
  same id: `LRUCacheWorkerLoRAManager.add_adapter` reloads it from its folder), but that reads a
  folder just the same, and the prefix cache keys KV blocks by adapter name and path
  (`kv_cache_utils._gen_lora_extra_hash_keys`), so blocks computed with the old adapter would be
  reused unless the cache were reset; a fresh name per version can never hit them, and a rollout's
  adapter is named by its version. At start the all-zero adapter of the initial version is loaded
  (equal to the base), which also checks that vLLM serves every module of this layout with a
  linear LoRA layer (an `lm_head` adapter loads without an error but does not match peft) before
  any rollout; what it cannot serve is refused naming `model.lora.sync: merged`.
- Continuous generation (`submit` / `step`, `rollout.continuous`): each sample is its own request
  (`n` = 1, seed `seed + i * n + j` as vLLM gives the children of an `n`-request, so a submission samples
  what `generate` would) with `RequestOutputKind.DELTA`, and `step` is one `LLMEngine.step()`: each
  request's new tokens and log-probs arrive as they are sampled. Weights may be replaced between two steps
  while requests run; vLLM labels every output token with the weight version set at that step
  (`set_weight_version`, `CompletionOutput.weight_versions`), which becomes the sample's per-token
  `policy_versions`. Every request carries the `cache_salt` of the version it was added under, so a request
  added after an update can never be served KV blocks computed under older weights, even while requests of
  the older version still run (`reset_prefix_cache` does nothing then). `recompute` aborts the running
  requests and adds each again as prompt + tokens so far, budget = what is left (AReaL's re-prefill).
- The engine runs inside this process by default (`GeneratorConfig.engine_process`); in its own
  processes (tensor parallelism, or asked for) vLLM starts them with spawn: build this from a spawn-safe
  entry point. Those processes talk over Unix sockets that vLLM leaves behind when it shuts down: they are bound
  in a folder of the generator's own (`rlhf-engine-vllm-*` in the temp folder), removed when it closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_engine.common.heap import set_aside
from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.generator import Generator, Submission
from rlhf_engine.rollout.staging import StagingFile
from rlhf_engine.rollout.vllm_adapters import AdapterSlot, max_lora_rank

log = logging.getLogger(__name__)

_EXTENSION = "rlhf_engine.rollout.vllm_worker.WeightReloadExtension"
_ENGINE_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_RPC_BASE_PATH", "TORCH_COMPILE_DISABLE")


@contextlib.contextmanager
def _engine_env(config: GeneratorConfig, sockets: str | None):
    """What vLLM and the processes it starts read from the environment while it builds the engine, set for the
    construction only, then the caller's values restored: VLLM_ENABLE_V1_MULTIPROCESSING; (`sockets` given)
    VLLM_RPC_BASE_PATH, the folder of the Unix sockets between the engine's processes (by default the temp folder,
    where vLLM leaves them behind when it shuts down); with `enforce_eager` in engine processes,
    TORCH_COMPILE_DISABLE (see `VLLMGenerator._sampling`)."""
    previous = {key: os.environ.get(key) for key in _ENGINE_ENV}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config.vllm_in_processes else "0"
    if sockets is not None:
        os.environ["VLLM_RPC_BASE_PATH"] = sockets
    if config.enforce_eager and config.vllm_in_processes:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class _Running:
    """One sample of a submission while vLLM runs it (`VLLMGenerator.step`)."""

    tag: Any
    prompt: int
    """Position of its prompt in the submission."""
    index: int
    """j: its sample number of that prompt."""
    prompt_ids: list[int]
    sampling: SamplingConfig
    seed: int
    budget: int
    started: float
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    """Each token's version as labelled when it arrived; vLLM's own labels replace those of the current request's
    tokens (from `segment` on) when it finishes."""
    segment: int = 0
    """Where the current request's tokens begin (> 0 after `recompute`)."""
    prefills: int = 0
    """Times it was added again under newer weights."""


def _whole_prefills(max_model_len: int) -> dict:
    """vLLM-CPU: no chunked prefill. Every request is seeded, and vLLM rewinds a request's seeded generator
    after a partial prefill, which a CPU generator cannot do (the engine dies with 'CPU Generator does not use
    offset' once a step's prompts pass its token budget). A GPU engine keeps chunked prefill."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}


class VLLMGenerator(Generator):
    """`Generator` on a `vllm.LLM` (see the module docstring)."""

    can_recompute = True
    steps_sequences = True

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        from vllm import LLM

        lora = {} if config.lora is None else {"enable_lora": True, "max_lora_rank": max_lora_rank(config.lora.r),
                                               "max_loras": 1}
        self.sockets_dir: str | None = (tempfile.mkdtemp(prefix="rlhf-engine-vllm-") if config.vllm_in_processes
                                        and "VLLM_RPC_BASE_PATH" not in os.environ else None)
        """The folder of the Unix sockets between the engine's processes, removed when this closes; None with the
        engine in this process (no sockets) or where the caller chose the folder (VLLM_RPC_BASE_PATH)."""
        set_aside()  # the engine build's own gc.collect() calls skip the imports (where the process's start paused it)
        try:
            with _engine_env(config, self.sockets_dir):
                self.llm = LLM(
                    model=config.model,
                    dtype=config.dtype,
                    seed=config.seed,
                    max_model_len=config.max_model_len,
                    kv_cache_memory_bytes=config.kv_cache_bytes,
                    enforce_eager=config.enforce_eager,
                    tensor_parallel_size=config.tensor_parallel_size,
                    logprobs_mode="processed_logprobs",
                    worker_extension_cls=_EXTENSION,
                    **_whole_prefills(config.max_model_len),
                    **lora,
                )
        except BaseException:
            self._remove_sockets()
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self.llm.llm_engine.set_weight_version(str(self.version))
        self._running: dict[str, _Running] = {}
        self._requests = 0
        self._staging: StagingFile | None = None
        self._adapters: AdapterSlot | None = None
        if config.lora is not None:
            self._adapters = AdapterSlot(self.llm, config.lora, config.model, config.staging_dir)
            try:
                self._adapters.load(self.version, {name: torch.zeros(shape) for name, shape in self.expected.items()})
            except BaseException:
                self._close()
                raise
        self.last_update_s: tuple[float, float] = (0.0, 0.0)
        """(staging copy, reload in the engine incl. prefix-cache reset) seconds of the last update; with
        adapters (folder write, add_lora incl. retiring the previous adapter)."""

    @staticmethod
    def _sampling_params(c: SamplingConfig, seed: int, *, n: int | None = None, max_tokens: int | None = None,
                         delta: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=c.n if n is None else n,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_tokens=c.max_new_tokens if max_tokens is None else max_tokens,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            stop=list(c.stop) or None,
            stop_token_ids=list(c.stop_token_ids) or None,
            include_stop_str_in_output=True,
            ignore_eos=c.ignore_eos,
            seed=seed,
            logprobs=0,
            detokenize=bool(c.stop),  # stop strings need text; otherwise skip detokenizing
        )

    def _sampling(self) -> contextlib.AbstractContextManager:
        """Around the engine's steps in this process. With `enforce_eager`, vLLM's own `torch.compile`d sampler
        helpers run eagerly too (`torch.compiler.set_stance("force_eager")`): the token ranks it computes with the
        log-probs (`batched_count_greater_than`) would otherwise be compiled with inductor at the first step, ~2 s
        of every start (measured on the tiny model: 16.3 -> 12.9 CPU-s to a built generator's first sample). In
        engine processes TORCH_COMPILE_DISABLE does the same (`_engine_env`)."""
        if self.config.enforce_eager and not self.config.vllm_in_processes:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def _generate(self, sub: Submission) -> list[Sample]:
        prompts, sampling, n = sub.prompts, sub.sampling, sub.sampling.n
        # each request seeds its own sampler; vLLM adds the child index j for n > 1: seed + i * n + j
        params = [self._sampling_params(sampling, sub.seed + i * n, max_tokens=sub.budget(i))
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        with self._sampling():
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                        lora_request=self._adapters.request if self._adapters is not None else None)
        elapsed = time.perf_counter() - t0
        samples = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            prompt_ids = torch.tensor(prompt, dtype=torch.int64)
            for j, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                ids = list(comp.token_ids)
                # logprobs=0: each position holds the sampled token's log-prob (rank may add no others)
                lps = [comp.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
                samples.append(
                    Sample(
                        sample_id=f"{i}/{j}",
                        prompt_id=i,
                        prompt_ids=prompt_ids,
                        response_ids=torch.tensor(ids, dtype=torch.int64),
                        behaviour_logp=torch.tensor(lps, dtype=torch.float32),
                        policy_versions=self.version,
                        finish_reason="stop" if comp.finish_reason == "stop" else "length",
                        generation_time=elapsed,
                    )
                )
        return samples

    # ---- continuous generation -------------------------------------------------------------------
    def _submit(self, sub: Submission) -> None:
        now = time.perf_counter()
        for i, prompt in enumerate(sub.prompts):
            for j in range(sub.sampling.n):
                self._add(_Running(sub.tag, i, j, prompt, sub.sampling, sub.seed + i * sub.sampling.n + j,
                                   sub.budget(i), now))

    def _add(self, seq: _Running) -> None:
        """Start (or restart, after `recompute`) `seq` as a vLLM request: its prompt and tokens so far, under
        this version's cache salt, for what is left of its budget."""
        key = f"r{self._requests}"
        self._requests += 1
        # a re-prefill draws with a seed of its own (the same seed would repeat the first tokens' randomness)
        seed = (seq.seed + 7_919 * seq.prefills) % (1 << 31)
        params = self._sampling_params(seq.sampling, seed, n=1, max_tokens=seq.budget - len(seq.ids), delta=True)
        self.llm.llm_engine.add_request(
            key, {"prompt_token_ids": seq.prompt_ids + seq.ids, "cache_salt": f"policy-v{self.version}"}, params,
            lora_request=self._adapters.request if self._adapters is not None else None)
        self._running[key] = seq

    def step(self) -> list[tuple[Any, Sample]]:
        """One `LLMEngine.step()`: every running request gains a token; returns the samples that finished."""
        if self._closed:
            raise RuntimeError("step() called on a closed generator")
        if not self._running:
            return []
        finished = []
        with self._sampling():
            outputs = self.llm.llm_engine.step()
        for out in outputs:
            seq = self._running.get(out.request_id)
            if seq is None:  # aborted by `recompute` after vLLM produced this output
                continue
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            seq.ids += ids
            # logprobs=0: each position holds the sampled token's log-prob (rank may add no others)
            seq.logps += [comp.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
            seq.versions += [self.version] * len(ids)
            if out.finished:
                del self._running[out.request_id]
                finished.append((seq.tag, self._finished(seq, comp)))
        return finished

    def _finished(self, seq: _Running, comp) -> Sample:
        """The `Sample` of a finished request, the versions of its last request's tokens as vLLM labelled them."""
        versions = [int(span.version) for span in comp.weight_versions or () for _ in range(span.end - span.start)]
        if len(versions) != len(seq.ids) - seq.segment:
            raise RuntimeError(f"vLLM labelled {len(versions)} of a request's {len(seq.ids) - seq.segment} tokens "
                               "with a weight version")
        return Sample(
            sample_id=f"{seq.prompt}/{seq.index}",
            prompt_id=seq.prompt,
            prompt_ids=torch.tensor(seq.prompt_ids, dtype=torch.int64),
            response_ids=torch.tensor(seq.ids, dtype=torch.int64),
            behaviour_logp=torch.tensor(seq.logps, dtype=torch.float32),
            policy_versions=torch.tensor(seq.versions[:seq.segment] + versions, dtype=torch.int64),
            finish_reason="stop" if comp.finish_reason == "stop" else "length",
            generation_time=time.perf_counter() - seq.started,
        )

    @property
    def running(self) -> int:
        return len(self._running)

    def recompute(self) -> int:
        """Abort every running request and add it again as prompt + its tokens so far under the current
        weights (their KV is computed again; the tokens keep the versions that sampled them)."""
        running, self._running = self._running, {}
        if running:
            self.llm.llm_engine.abort_request(list(running))
        for seq in running.values():  # their tokens so far keep the labels they arrived with (no step since)
            seq.segment = len(seq.ids)
            seq.prefills += 1
            self._add(seq)
        return len(running)

    def _apply_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> None:
        if self._adapters is not None:
            # a new adapter name: the prefix cache cannot serve blocks of the old one (no reset needed)
            self.last_update_s = self._adapters.load(version, named_tensors)
            self.llm.llm_engine.set_weight_version(str(version))
            log.info("adapters written in %.3f s, loaded in %.3f s", *self.last_update_s)
            return
        dtype = getattr(torch, self.config.dtype)
        t0 = time.perf_counter()
        if self.config.vllm_in_processes:  # one copy into a file the engine's process maps, then a reload from it
            if self._staging is None:
                self._staging = StagingFile(self.expected, dtype, self.config.staging_dir)
            self._staging.write(named_tensors)
            t1 = time.perf_counter()
            self.llm.collective_rpc("rlhf_reload_weights",
                                    args=(self._staging.path, self._staging.size, self._staging.specs))
        else:  # the engine is in this process: it reads the tensors themselves
            t1 = t0
            self.llm.collective_rpc("rlhf_load_weights",  # converted one tensor at a time, as they are loaded
                                    args=(((name, t.to(dtype)) for name, t in named_tensors.items()),))
        self.llm.reset_prefix_cache()  # frees old blocks when nothing runs; running or not, salts keep them apart
        self.llm.llm_engine.set_weight_version(str(version))
        self.last_update_s = (t1 - t0, time.perf_counter() - t1)
        log.info("weights staged in %.3f s, reloaded in %.3f s", *self.last_update_s)

    def _close(self) -> None:
        llm, self.llm = self.llm, None
        if self._adapters is not None:
            self._adapters.close()
            self._adapters = None
        try:
            if self._staging is not None:
                llm.collective_rpc("rlhf_release_staging")
        finally:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            try:
                # stops the engine core (process) and waits for it (LLM has no public close in 0.32)
                llm.llm_engine.engine_core.shutdown()
            finally:
                self._remove_sockets()

    def _remove_sockets(self) -> None:
        if self.sockets_dir is not None:
            shutil.rmtree(self.sockets_dir, ignore_errors=True)
            self.sockets_dir = None
