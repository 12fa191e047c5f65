"""What the trainer trains on: the prompts in flight and the rules a rollout must pass to join them.

A prompt is *in flight* from the moment the trainer hands it out (`issue`) until a step takes
its rollouts: the batch it was handed out in (`take`), or, streaming, any step once its group is complete
and at the latest the one its staleness bound makes it due for (`take_streamed`). A rollout from the wire is accepted only if, in this order:

1. its sender completed the handshake on this run             else `unknown_sender`
2. its prompt is in flight                                     else `unknown_prompt`, or
                                                               `already_trained` (`late` if it was
                                                               re-issued)
3. it has 1..response_length response tokens, each in
   [0, vocab_size), and as many behaviour log-probs, finite
   and <= 0                                                    else `empty_response`, `too_long`,
                                                               `token_out_of_range`, `logprob_length`,
                                                               `bad_logprob`
4. every token's policy version lies in [the prompt's
   min_policy_version, the trainer's version] (the staleness
   window: its oldest token counts)                            else `stale_version`, `future_version`
5. its rollout id is new for that prompt                       else `duplicate`
6. it comes from the prompt's holder (see below)               else `late` (the prompt was re-issued)
                                                               or `wrong_holder`
7. the prompt has fewer than num_generations rollouts          else `too_many`

The prompt tokens of an accepted rollout are the trainer's own, never the wire's, except in a run whose
environment renders each episode's opening in the generator (`IntakeLimits.env_prompt_tokens`): then they are
the rollout's, 1..env_prompt_tokens tokens in [0, vocab_size) (else `bad_prompt`), and the same as those of the
prompt's rollouts accepted before (else `prompt_mismatch`: a group is one prompt).

Holders and re-issues: the first sender whose rollout for a prompt is accepted *holds* it; only
its rollouts count for that prompt, so a group is never a mix of two samplings. A prompt is
re-issued (handed out again, `reissue`) when its holder is lost before delivering
num_generations rollouts, or when it stalls: no rollout for it within a timeout of its issue or of
its last rollout (a lost or stolen batch, a generator that died before sending anything, or one
that delivers part of a group and no more): its partial rollouts are discarded, the old holder's
further rollouts for it are `late`, and the next sender to deliver holds it. The staleness bound
stays the first issue's `min_policy_version`: a re-issue only ever asks for newer weights.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from rlhf_engine.data.samples import Sample


@dataclass(frozen=True)
class IntakeLimits:
    """What a rollout may hold, from the run config and the policy."""

    vocab_size: int
    """Token ids must lie in [0, vocab_size) (the policy's embedding rows)."""
    response_length: int
    """Most response tokens (`ppo.response_length`)."""
    num_generations: int
    """Rollouts a prompt trains on (`ppo.num_generations`)."""
    env_prompt_tokens: int = 0
    """> 0: the run's environment renders each episode's opening in the generator (its `reset` returns
    messages): a rollout's prompt tokens are kept, at most this many (`data.max_prompt_length`); 0: every
    rollout gets the trainer's prompt tokens."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "response_length", "num_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.env_prompt_tokens < 0:
            raise ValueError(f"env_prompt_tokens ({self.env_prompt_tokens}) must be >= 0")

    @property
    def own_prompts(self) -> bool:
        """An environment renders the openings: rollouts keep their own prompt tokens."""
        return self.env_prompt_tokens > 0


def check_content(rollout: Sample, limits: IntakeLimits, min_version: int, trainer_version: int) -> str | None:
    """The drop reason for `rollout`'s tokens, log-probs and policy version (rules 3 and 4), or None."""
    tokens, logprobs = rollout.response_ids, rollout.behaviour_logp  # [R], [R]
    if tokens.numel() == 0:
        return "empty_response"
    if tokens.numel() > limits.response_length:
        return "too_long"
    if int(tokens.min()) < 0 or int(tokens.max()) >= limits.vocab_size:
        return "token_out_of_range"
    if logprobs.shape != tokens.shape:
        return "logprob_length"
    if not bool(torch.isfinite(logprobs).all()) or bool((logprobs > 0).any()):
        return "bad_logprob"
    if int(rollout.policy_versions[0]) < min_version:  # non-decreasing: the oldest token first
        return "stale_version"
    if int(rollout.policy_versions[-1]) > trainer_version:
        return "future_version"
    prompt = rollout.prompt_ids
    if limits.own_prompts and (not 0 < prompt.numel() <= limits.env_prompt_tokens or int(prompt.min()) < 0
                                     or int(prompt.max()) >= limits.vocab_size):
        return "bad_prompt"
    return None


@dataclass
class PromptInFlight:
    """One prompt handed out and the rollouts accepted for it so far."""

    prompt_id: int
    step: int
    token_ids: list[int]
    min_policy_version: int
    """Of the first issue: the staleness bound of this prompt's samples."""
    active_at: float
    """Time of the latest (re-)issue or accepted rollout."""
    holder: str | None = None
    completed: int = -1
    """When its group became complete (the intake's count of completed groups then); -1: incomplete."""
    rollouts: list[Sample] = field(default_factory=list)
    sample_ids: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)
    """Former holders: their rollouts for this prompt are late."""
    reissues: int = 0

    def accept(self, rollout: Sample, sender: str, now: float, own_prompt: bool = False) -> Sample:
        """Record `rollout` from `sender` as one of this prompt's samples, with the trainer's prompt tokens (the
        ones it handed out, not the sender's copy; `own_prompt`: the rollout's, rendered by an environment);
        returns it."""
        self.holder, self.active_at = sender, now
        self.sample_ids.add(rollout.sample_id)
        accepted = rollout if own_prompt else dataclasses.replace(
            rollout, prompt_ids=torch.tensor(self.token_ids, dtype=torch.int64))
        self.rollouts.append(accepted)
        return accepted

    def reset(self, now: float) -> None:
        """Hand the prompt out again: the samples accepted so far go, and its holder's later ones are late."""
        if self.holder is not None:
            self.replaced.add(self.holder)
        self.holder, self.rollouts, self.active_at, self.completed = None, [], now, -1
        self.reissues += 1


class Intake:
    """The prompts in flight, the acceptance rules, and the counts of what was dropped and why."""

    def __init__(self, limits: IntakeLimits) -> None:
        self.limits = limits
        self._prompts: dict[int, PromptInFlight] = {}
        self._issued_below = 0
        """Every prompt id below this one was issued (ids grow with the batch): each is in flight or trained."""
        self._completed = 0
        """Groups completed so far: the order in which `take_streamed` takes them."""
        self._reissued_ids: set[int] = set()
        """Prompts ever re-issued: a rollout for one is `late`, also after it trained."""
        self.dropped: Counter[str] = Counter()
        self.accepted_tokens = 0
        """Response tokens of every rollout accepted so far (with `accepted`: the sampled mean length)."""
        self.accepted = 0
        self.reissued = 0
        """Prompts handed out again."""

    # ---- issuing -----------------------------------------------------------------------------
    def issue(self, step: int, prompts: dict[int, list[int]], min_policy_version: int, now: float) -> None:
        """Put the prompts `{prompt_id: token_ids}` of `step` in flight."""
        for pid, tokens in prompts.items():
            if pid in self._prompts or pid < self._issued_below:
                raise ValueError(f"prompt {pid} of step {step} was issued before")
            self._prompts[pid] = PromptInFlight(pid, step, list(tokens), min_policy_version, now)
        if prompts:
            self._issued_below = max(prompts) + 1

    def held_by(self, sender: str) -> list[int]:
        """Prompts that may be lost with `sender`: incomplete ones it holds, and those nobody holds
        yet (any generator may have taken them)."""
        n = self.limits.num_generations
        return sorted(p.prompt_id for p in self._prompts.values()
                      if len(p.rollouts) < n and (p.holder is None or p.holder == sender))

    def stalled(self, now: float, timeout_s: float) -> list[int]:
        """Incomplete prompts without a rollout within `timeout_s` of their latest issue or rollout."""
        n = self.limits.num_generations
        return sorted(p.prompt_id for p in self._prompts.values()
                      if len(p.rollouts) < n and now - p.active_at >= timeout_s)

    def reissue(self, prompt_ids: list[int], now: float) -> dict[int, dict[int, list[int]]]:
        """Mark `prompt_ids` as handed out again; returns them grouped by step ({step: {id: tokens}})."""
        by_step: dict[int, dict[int, list[int]]] = {}
        for pid in prompt_ids:
            p = self._prompts[pid]
            p.reset(now)
            self.reissued += 1
            self._reissued_ids.add(pid)
            by_step.setdefault(p.step, {})[pid] = p.token_ids
        return by_step

    # ---- receiving ---------------------------------------------------------------------------
    def offer(self, rollout: Sample, sender: str, known_senders, trainer_version: int,
              now: float = 0.0) -> Sample | None:
        """Accept `rollout` from `sender` (the transport's authenticated name) and return it with the
        trainer's prompt tokens, or count why it is dropped and return None.

        known_senders: the senders that completed the handshake on this run (a container); now: the
        clock of `issue`/`stalled`.
        """
        reason = self._check(rollout, sender, known_senders, trainer_version)
        if reason is not None:
            self.dropped[reason] += 1
            return None
        p = self._prompts[rollout.prompt_id]
        accepted = p.accept(rollout, sender, now, self.limits.own_prompts)
        self.accepted += 1
        self.accepted_tokens += int(rollout.response_ids.numel())
        if len(p.rollouts) == self.limits.num_generations:
            p.completed, self._completed = self._completed, self._completed + 1
        return accepted

    def _check(self, rollout: Sample, sender: str, known_senders, trainer_version: int) -> str | None:
        if sender not in known_senders:
            return "unknown_sender"
        p = self._prompts.get(rollout.prompt_id)
        if p is None:
            if rollout.prompt_id in self._reissued_ids:
                return "late"
            return "already_trained" if 0 <= rollout.prompt_id < self._issued_below else "unknown_prompt"
        reason = check_content(rollout, self.limits, p.min_policy_version, trainer_version)
        if reason is not None:
            return reason
        if rollout.sample_id in p.sample_ids:
            return "duplicate"
        if sender in p.replaced:
            return "late"
        if p.holder is not None and p.holder != sender:
            return "late" if p.reissues else "wrong_holder"
        if len(p.rollouts) >= self.limits.num_generations:
            return "too_many"
        if self.limits.own_prompts and p.rollouts and not torch.equal(rollout.prompt_ids, p.rollouts[0].prompt_ids):
            return "prompt_mismatch"  # a group (GRPO / RLOO) is one prompt
        return None

    # ---- training ----------------------------------------------------------------------------
    def complete(self, step: int) -> bool:
        """Whether every prompt of `step` has num_generations rollouts."""
        prompts = [p for p in self._prompts.values() if p.step == step]
        return bool(prompts) and all(len(p.rollouts) == self.limits.num_generations for p in prompts)

    def take(self, step: int) -> list[Sample]:
        """The rollouts of a complete `step`, ordered by prompt id (a group stays together); its prompts
        leave the flight (later rollouts for them are `already_trained`, or `late`)."""
        if not self.complete(step):
            raise ValueError(f"step {step} is not complete")
        return self._leave([p for p in self._prompts.values() if p.step == step])

    def take_streamed(self, count: int, version: int, max_staleness: int) -> list[Sample] | None:
        """The rollouts of `count` complete prompts for a step at policy `version`, or None while they cannot
        be taken yet. A prompt handed out at version v is *due* by version v + max_staleness (its samples
        are no older than v). Taken: every due prompt (the step waits for their groups), then complete ones by
        earliest due version, then in the order they completed; but only a choice that leaves each later
        step at most `count` prompts due (else the step waits for an earlier-due group). Ordered by prompt id
        (a group stays together); the prompts leave the flight."""
        due_by = {p.prompt_id: p.min_policy_version + max_staleness for p in self._prompts.values()}
        due = [p for p in self._prompts.values() if due_by[p.prompt_id] <= version]
        if len(due) > count:
            raise RuntimeError(f"{len(due)} prompts are due at version {version} for a step of {count}: prompts "
                               f"were handed out past the staleness bound")
        if any(p.completed < 0 for p in due):
            return None
        ready = sorted((p for p in self._prompts.values() if p.completed >= 0 and due_by[p.prompt_id] > version),
                       key=lambda p: (due_by[p.prompt_id], p.completed))
        chosen = due + ready[:count - len(due)]
        if len(chosen) < count:
            return None
        taken = {p.prompt_id for p in chosen}
        left = sorted(d for pid, d in due_by.items() if pid not in taken)
        # the steps at versions version+1 .. d take `count` each: the i-th earliest-due prompt left must fit
        if any(i + 1 > (d - version) * count for i, d in enumerate(left)):
            return None
        return self._leave(chosen)

    def _leave(self, prompts: list[PromptInFlight]) -> list[Sample]:
        """The rollouts of `prompts` by prompt id; they leave the flight (later rollouts for them are
        `already_trained`, or `late`)."""
        prompts = sorted(prompts, key=lambda p: p.prompt_id)
        for p in prompts:
            del self._prompts[p.prompt_id]
        return [r for p in prompts for r in p.rollouts]

    def in_flight(self, step: int) -> int:
        """Prompts of `step` still in flight."""
        return sum(p.step == step for p in self._prompts.values())

    def received(self, step: int) -> int:
        """Rollouts accepted so far for `step`."""
        return sum(len(p.rollouts) for p in self._prompts.values() if p.step == step)
