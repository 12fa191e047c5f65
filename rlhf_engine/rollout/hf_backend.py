"""`HFGenerator`: rollouts from transformers `generate` (KV cache, left padding), for machines
without vLLM.

Log-probs are those of the distribution the sampler drew from, as in the vLLM backend: we pass
the warpers ourselves (temperature, then top-k, then top-p — vLLM's order) followed by a
processor that keeps `log_softmax` of the processed scores of the current step; a stopping
criterion, called once the token is sampled, picks that token's log-prob. Memory stays
O(batch x vocab), where `output_scores=True` would keep every step's [batch, vocab] scores.
Sampling draws from a forked RNG seeded per call, so the process's global RNG is untouched.

With `config.lora` the model is wrapped with the trainer's `apply_lora` (peft) and an update copies
the adapter tensors into its LoRA parameters in place.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping

import torch

from rlhf_engine.data.collate import left_pad
from rlhf_engine.data.samples import Sample
from rlhf_engine.models.end_of_turn import model_end_of_turn_ids
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.generator import Generator, Submission


def pick_attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn is importable, else sdpa."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def warpers(c: SamplingConfig) -> list:
    """transformers logits warpers equal to vLLM's sampler processing of `c` (none when greedy)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if c.temperature == 0:
        return []
    out = []
    if c.temperature != 1.0:
        out.append(TemperatureLogitsWarper(c.temperature))
    if c.top_k:
        out.append(TopKLogitsWarper(c.top_k))
    if c.top_p < 1.0:
        out.append(TopPLogitsWarper(c.top_p))
    return out


class _StepRecorder:
    """Both ends of one `generate` step: as the last logits processor it keeps the processed
    log-probs [B, V]; as a stopping criterion it records the sampled token's log-prob, ends a row
    on a stop token or stop string, and notes each row's response length."""

    def __init__(self, tokenizer, prompt_width: int, batch: int, stop_ids: list[int], stop: tuple[str, ...], device) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.int64, device=device)
        self.stop = stop
        # a stop string of k bytes spans at most k tokens (every token decodes to >= 1 byte)
        self.tail = max((len(s.encode()) for s in stop), default=0) + 1
        self.step_logprobs: torch.Tensor | None = None  # [B, V] of the current step
        self.logprobs: list[torch.Tensor] = []  # T x [B]
        self.length = torch.full((batch,), -1, dtype=torch.int64)
        """Response length of each finished row (stop token / string included); -1 while running."""

    def process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step_logprobs = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
        return scores

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1]  # [B], the token just sampled
        self.logprobs.append(self.step_logprobs.gather(-1, last[:, None])[:, 0])
        steps = input_ids.shape[1] - self.prompt_width
        done = torch.isin(last, self.stop_ids)  # [B]
        if self.stop:
            for b in (self.length < 0).nonzero()[:, 0].tolist():
                tail = self.tokenizer.decode(input_ids[b, max(self.prompt_width, input_ids.shape[1] - self.tail) :])
                if any(s in tail for s in self.stop):
                    done[b] = True
        newly = done.cpu() & (self.length < 0)  # forces a device sync
        self.length[newly] = steps
        return done


class HFGenerator(Generator):
    """`Generator` on a transformers causal LM (see the module docstring)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self.attn_implementation = pick_attn_implementation(config.attn_implementation)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=getattr(torch, config.dtype), attn_implementation=self.attn_implementation
        ).to(self.device)
        self._params = self._update_targets(config)
        """The live tensor each name of an update is copied into."""
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.end_of_turn_ids = model_end_of_turn_ids(self.tokenizer, self.model)
        """Every id that ends a turn (as vLLM reads them from the model's generation config)."""

    def _stop_ids(self, c: SamplingConfig) -> list[int]:
        eos = [] if c.ignore_eos else self.end_of_turn_ids
        return sorted(set(eos) | set(c.stop_token_ids))

    def _generation_config(self, c: SamplingConfig, max_new_tokens: int):
        from transformers import GenerationConfig

        # the warpers are ours (see `warpers`): generate must add none of its own
        return GenerationConfig(
            do_sample=c.temperature > 0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self._stop_ids(c) or None,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    def _generate(self, sub: Submission) -> list[Sample]:
        prompts, sampling = sub.prompts, sub.sampling
        rows = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]  # (prompt, sample)
        t0 = time.perf_counter()
        results = []
        for start in range(0, len(rows), self.config.max_batch_size):
            chunk = rows[start : start + self.config.max_batch_size]
            results += self._generate_chunk([prompts[i] for i, _ in chunk], [sub.budget(i) for i, _ in chunk],
                                            sampling, sub.seed + start)
        elapsed = time.perf_counter() - t0
        return [
            Sample(
                sample_id=f"{i}/{j}",
                prompt_id=i,
                prompt_ids=torch.tensor(prompts[i], dtype=torch.int64),
                response_ids=ids,
                behaviour_logp=lps,
                policy_versions=self.version,
                finish_reason=finish,
                generation_time=elapsed,
            )
            for (i, j), (ids, lps, finish) in zip(rows, results)
        ]

    @torch.inference_mode()
    def _generate_chunk(
        self, prompts: list[list[int]], budgets: list[int], c: SamplingConfig, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        input_ids, attention_mask = left_pad(prompts, self.pad_id)  # [B, P]
        width = input_ids.shape[1]
        caps = [min(b, self.config.max_model_len - len(p)) for p, b in zip(prompts, budgets)]  # per-row length limit
        recorder = _StepRecorder(self.tokenizer, width, len(prompts), self._stop_ids(c), c.stop, self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self._generation_config(c, max(caps)),
                logits_processor=LogitsProcessorList([*warpers(c), recorder.process]),
                stopping_criteria=StoppingCriteriaList([recorder]),
            )
        tokens = sequences[:, width:].cpu()  # [B, T]
        logprobs = torch.stack(recorder.logprobs, dim=1).cpu()  # [B, T]
        results = []
        for b, cap in enumerate(caps):
            finished = int(recorder.length[b])
            if 0 < finished <= cap:
                length, reason = finished, "stop"
            else:
                length, reason = min(cap, tokens.shape[1]), "length"
            results.append((tokens[b, :length].clone(), logprobs[b, :length].clone(), reason))
        return results

    def _update_targets(self, config: GeneratorConfig) -> dict[str, torch.Tensor]:
        """{update name: live tensor}: the model's parameters (a tied lm_head.weight aliases the
        embeddings), or with `config.lora` the adapters of the peft-wrapped model."""
        if config.lora is None:
            params = self.model.state_dict(keep_vars=True)
            return {name: params[name] for name in self.expected}
        from rlhf_engine.models.lora import apply_lora

        self.model = apply_lora(self.model, config.lora)
        params = self.model.state_dict(keep_vars=True)
        # peft saves `...lora_A.weight`; the live parameter of adapter "default" is `...lora_A.default.weight`
        live = {name: ".".join([*name.split(".")[:-1], "default", name.split(".")[-1]]) for name in self.expected}
        missing = sorted(name for name, key in live.items() if key not in params)
        if missing:
            raise RuntimeError(f"the peft-wrapped {config.model} has no parameters for adapters {missing[:5]} "
                               f"({len(missing)} of {len(live)})")
        return {name: params[key] for name, key in live.items()}

    @torch.no_grad()
    def _apply_weights(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in named_tensors.items():
            self._params[name].copy_(tensor)

    def _close(self) -> None:
        self.model = None
