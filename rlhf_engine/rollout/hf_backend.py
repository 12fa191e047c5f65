"""`HFGenerator`: rollouts from transformers `generate` (KV cache, left padding), for machines
without vLLM.

Log-probs come from the processed scores `generate` sampled from (`output_scores=True`: after
temperature, top-k and top-p), so they are the sampler's distribution, as in the vLLM backend.
Sampling draws from a forked RNG seeded per call, so the process's global RNG is untouched.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping

import torch

from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.generator import Generator
from rlhf_engine.rollout.types import Completion


def pick_attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn is importable, else sdpa."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to one width: (input_ids [B, P], attention_mask [B, P]) int64."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[b, width - len(p) :] = 1
    return ids, mask


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of `tokens` [B, T] under the processed `scores` (T tensors [B, V]) -> [B, T] fp32."""
    out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, s in enumerate(scores):  # one [B, V] row block at a time: never a [B, T, V] copy
        out[:, t] = torch.log_softmax(s.float(), dim=-1).gather(-1, tokens[:, t : t + 1])[:, 0]
    return out


class _FinishRecorder:
    """A `StoppingCriteria` that ends a row on a stop token or stop string and records its length."""

    def __init__(self, tokenizer, prompt_width: int, batch: int, stop_ids: list[int], stop: tuple[str, ...], device) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.int64, device=device)
        self.stop = stop
        # a stop string of k bytes spans at most k tokens (every token decodes to >= 1 byte)
        self.tail = max((len(s.encode()) for s in stop), default=0) + 1
        self.length = torch.full((batch,), -1, dtype=torch.int64)
        """Response length of each finished row (stop token / string included); -1 while running."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        steps = input_ids.shape[1] - self.prompt_width
        done = torch.isin(input_ids[:, -1], self.stop_ids)  # [B]
        if self.stop:
            for b in (self.length < 0).nonzero()[:, 0].tolist():
                tail = self.tokenizer.decode(input_ids[b, max(self.prompt_width, input_ids.shape[1] - self.tail) :])
                if any(s in tail for s in self.stop):
                    done[b] = True
        newly = done.cpu() & (self.length < 0)
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
        ).to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _stop_ids(self, c: SamplingConfig) -> list[int]:
        eos = [] if c.ignore_eos or self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        return sorted(set(eos) | set(c.stop_token_ids))

    def _generation_config(self, c: SamplingConfig, max_new_tokens: int):
        from transformers import GenerationConfig

        sample = c.temperature > 0
        return GenerationConfig(
            do_sample=sample,
            temperature=c.temperature if sample else None,
            top_k=c.top_k if sample else None,
            top_p=c.top_p if sample else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=self._stop_ids(c) or None,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            use_cache=True,
        )

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Completion]:
        c = sampling
        rows = [(i, j) for i in range(len(prompts)) for j in range(c.n)]  # (prompt, sample)
        t0 = time.perf_counter()
        results = []
        for start in range(0, len(rows), self.config.max_batch_size):
            chunk = rows[start : start + self.config.max_batch_size]
            results += self._generate_chunk([prompts[i] for i, _ in chunk], sampling, seed + start)
        elapsed = time.perf_counter() - t0
        completions = []
        for (i, j), (ids, lps, finish) in zip(rows, results):
            completions.append(
                Completion(
                    prompt_index=i,
                    sample_index=j,
                    prompt_ids=torch.tensor(prompts[i], dtype=torch.int64),
                    response_ids=ids,
                    logprobs=lps,
                    policy_version=self.version,
                    finish_reason=finish,
                    generation_time=elapsed,
                )
            )
        return completions

    @torch.inference_mode()
    def _generate_chunk(
        self, prompts: list[list[int]], c: SamplingConfig, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        from transformers import StoppingCriteriaList

        input_ids, attention_mask = left_pad(prompts, self.pad_id)  # [B, P]
        width = input_ids.shape[1]
        caps = [min(c.max_new_tokens, self.config.max_model_len - len(p)) for p in prompts]  # per-row length limit
        recorder = _FinishRecorder(self.tokenizer, width, len(prompts), self._stop_ids(c), c.stop, self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self._generation_config(c, max(caps)),
                stopping_criteria=StoppingCriteriaList([recorder]),
            )
        tokens = out.sequences[:, width:]  # [B, T]
        logprobs = sampled_logprobs(out.scores, tokens).cpu()  # [B, T]; forces a device sync
        tokens = tokens.cpu()
        results = []
        for b, cap in enumerate(caps):
            finished = int(recorder.length[b])
            if 0 < finished <= cap:
                length, reason = finished, "stop"
            else:
                length, reason = min(cap, tokens.shape[1]), "length"
            results.append((tokens[b, :length].clone(), logprobs[b, :length].clone(), reason))
        return results

    @torch.no_grad()
    def _apply_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        params = self.model.state_dict(keep_vars=True)  # tied lm_head.weight aliases the embeddings
        for name, tensor in named_tensors.items():
            params[name].copy_(tensor)

    def _close(self) -> None:
        self.model = None
