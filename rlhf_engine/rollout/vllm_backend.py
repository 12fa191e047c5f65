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
- The engine runs inside this process by default (`GeneratorConfig.engine_process`); in its own
  processes (tensor parallelism, or asked for) vLLM starts them with spawn: build this from a spawn-safe
  entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping

import torch

from rlhf_engine.data.samples import Sample
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.generator import Generator
from rlhf_engine.rollout.staging import StagingFile
from rlhf_engine.rollout.vllm_adapters import AdapterSlot, max_lora_rank

log = logging.getLogger(__name__)

_EXTENSION = "rlhf_engine.rollout.vllm_worker.WeightReloadExtension"


@contextlib.contextmanager
def _multiprocessing_env(engine_process: bool):
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING while building the engine only: set it for the
    construction, then restore the caller's value."""
    key, previous = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ[key] = "1" if engine_process else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


class VLLMGenerator(Generator):
    """`Generator` on a `vllm.LLM` (see the module docstring)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        from vllm import LLM

        lora = {} if config.lora is None else {"enable_lora": True, "max_lora_rank": max_lora_rank(config.lora.r),
                                               "max_loras": 1}
        with _multiprocessing_env(config.vllm_in_processes):
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
                **lora,
            )
        self.tokenizer = self.llm.get_tokenizer()
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
    def _sampling_params(c: SamplingConfig, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=c.n,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_tokens=c.max_new_tokens,
            stop=list(c.stop) or None,
            stop_token_ids=list(c.stop_token_ids) or None,
            include_stop_str_in_output=True,
            ignore_eos=c.ignore_eos,
            seed=seed,
            logprobs=0,
            detokenize=bool(c.stop),  # stop strings need text; otherwise skip detokenizing
        )

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        n = sampling.n
        # each request seeds its own sampler; vLLM adds the child index j for n > 1: seed + i * n + j
        params = [self._sampling_params(sampling, seed + i * n) for i in range(len(prompts))]
        t0 = time.perf_counter()
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

    def _apply_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> None:
        if self._adapters is not None:
            # a new adapter name: the prefix cache cannot serve blocks of the old one (no reset needed)
            self.last_update_s = self._adapters.load(version, named_tensors)
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
        self.llm.reset_prefix_cache()
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
            # stops the engine core (process) and waits for it (LLM has no public close in 0.32)
            llm.llm_engine.engine_core.shutdown()
