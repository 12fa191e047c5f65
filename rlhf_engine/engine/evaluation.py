"""Held-out evaluation of a PPO run through its generators (`data.eval_prompts`, `engine.eval_steps`).

An `EvalRound` hands every evaluation prompt out once, in batches tagged for evaluation
(`PromptBatch.eval_samples`: `engine.eval_samples` completions per prompt at `engine.eval_temperature`), with
the trainer's current policy version as the oldest version allowed. The engine waits for the round before it
trains on, so no newer version exists meanwhile: the round samples exactly that version (in async mode too;
the batches handed out before it are sampled first, as they would have been). Its rollouts come back tagged
`eval` and never reach the training intake; the round accepts them by the same content rules (`intake`),
one holder per prompt, and hands a prompt out again when nothing came for it within
`engine.reissue_timeout_s`. Evaluation batches have ids -1, -2, ...: the generators seed them apart from the
training batches, and alike at every round (the rounds differ only by the weights).

`eval_metrics` turns the scored samples into `eval/*` metrics; a sample *passes* when its gold score
(`model.gold_fn`) is > 0, or its reward when there is no gold function; `eval/pass@k` is the fraction of
prompts with at least one passing sample among their k.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from rlhf_engine.data.samples import Sample
from rlhf_engine.engine.intake import IntakeLimits, PromptInFlight, check_content
from rlhf_engine.transport import PromptBatch


class EvalRound:
    """One evaluation of `prompts` (token ids; prompt id = index) at policy `version`.

    limits: what a rollout may hold, `num_generations` being the samples per prompt; max_batch_prompts: the
    most prompts in one batch (`transport.max_batch_prompts`); records: each prompt's dataset record, for the
    environment (None: a run without one).
    """

    def __init__(self, prompts: list[list[int]], *, samples: int, temperature: float, version: int,
                 limits: IntakeLimits, max_batch_prompts: int, now: float,
                 records: list[dict] | None = None) -> None:
        if limits.num_generations != samples:
            raise ValueError(f"limits.num_generations ({limits.num_generations}) must be samples ({samples})")
        self.prompts = prompts
        self.version = version
        self.limits = limits
        ids = list(range(len(prompts)))
        chunks = [ids[i:i + max_batch_prompts] for i in range(0, len(ids), max_batch_prompts)]
        self.batches = [PromptBatch(batch_id=-1 - b, prompt_ids=chunk, prompts=[prompts[i] for i in chunk],
                                    min_policy_version=version, eval_samples=samples, eval_temperature=temperature,
                                    records=[records[i] for i in chunk] if records is not None else None)
                        for b, chunk in enumerate(chunks)]
        self._prompts = {i: PromptInFlight(i, b, prompts[i], version, now)  # its `step`: its batch's index
                         for b, chunk in enumerate(chunks) for i in chunk}
        self.dropped: Counter[str] = Counter()
        self.reissued = 0

    def offer(self, rollout: Sample, known_senders, now: float) -> bool:
        """Accept an evaluation rollout, or count why not (`dropped`); returns whether it was accepted."""
        reason = self._check(rollout, known_senders)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        self._prompts[rollout.prompt_id].accept(rollout, rollout.sender, now, self.limits.own_prompts)
        return True

    def _check(self, rollout: Sample, known_senders) -> str | None:
        if rollout.sender not in known_senders:
            return "unknown_sender"
        p = self._prompts.get(rollout.prompt_id)
        if not rollout.eval or p is None:
            return "unknown_prompt"
        # the version must be the round's; the log-probs are not used (and greedy ones need not be a distribution's)
        reason = check_content(dataclasses.replace(rollout, behaviour_logp=torch.zeros_like(rollout.behaviour_logp)),
                               self.limits, self.version, self.version)
        if reason is not None:
            return reason
        if rollout.sample_id in p.sample_ids:
            return "duplicate"
        if rollout.sender in p.replaced or (p.holder is not None and p.holder != rollout.sender):
            return "late"
        if len(p.rollouts) >= self.limits.num_generations:
            return "too_many"
        return None

    def complete(self) -> bool:
        return all(len(p.rollouts) == self.limits.num_generations for p in self._prompts.values())

    def stalled(self, now: float, timeout_s: float) -> list[PromptBatch]:
        """The incomplete prompts without a rollout for `timeout_s`, reset and batched to be handed out again
        (under their first batch's id: the same seed)."""
        again: dict[int, list[int]] = {}
        for pid, p in self._prompts.items():
            if len(p.rollouts) < self.limits.num_generations and now - p.active_at >= timeout_s:
                p.reset(now)
                again.setdefault(p.step, []).append(pid)
                self.reissued += 1
        return [dataclasses.replace(self.batches[b], prompt_ids=ids, prompts=[self.prompts[i] for i in ids])
                for b, ids in sorted(again.items())]

    def samples(self) -> list[Sample]:
        """Every accepted rollout, by prompt id (a prompt's samples in the order they came)."""
        if not self.complete():
            raise ValueError("the evaluation round is not complete")
        return [r for pid in sorted(self._prompts) for r in self._prompts[pid].rollouts]


def eval_metrics(rewards: torch.Tensor, gold: torch.Tensor | None, lengths: torch.Tensor, prompt_ids: torch.Tensor,
                 versions: torch.Tensor) -> dict[str, float]:
    """`eval/*` metrics of N samples of P prompts, k = N / P each.

    rewards [N] fp32, gold [N] fp32 or None, lengths [N] (response tokens), prompt_ids [N] int64 in [0, P),
    versions [N] int64 (the policy version that sampled each). A sample passes when gold > 0 (else reward > 0;
    a NaN passes nothing); `eval/pass@k` = mean over prompts of [any of its k samples passes]. Non-finite
    rewards are left out of `eval/reward_mean` and counted in `eval/nonfinite_rewards`.
    """
    n = rewards.numel()
    num_prompts = int(prompt_ids.max()) + 1
    k = n // num_prompts
    passed = (gold if gold is not None else rewards) > 0  # [N]
    # any over each prompt's samples: scatter-max of 0/1 into [P]
    prompt_passed = torch.zeros(num_prompts).scatter_reduce(0, prompt_ids, passed.float(), reduce="amax")  # [P]
    finite = torch.isfinite(rewards)
    stats = {
        "eval/reward_mean": float(rewards[finite].mean()) if bool(finite.any()) else float("nan"),
        "eval/nonfinite_rewards": float(n - int(finite.sum())),
        f"eval/pass@{k}": float(prompt_passed.mean()),
        "eval/response_length_mean": float(lengths.float().mean()),
        "eval/policy_version": float(versions.min()),
        "eval/samples": float(n),
    }
    if gold is not None:
        stats["eval/gold_mean"] = float(gold.mean())
    return stats
