"""The rollout acceptance rules, one by one, and the holder / re-issue bookkeeping."""

import pytest
import torch

from rlhf_engine.engine.intake import Intake, IntakeLimits, check_content
from rlhf_engine.transport import Sample

LIMITS = IntakeLimits(vocab_size=10, response_length=4, num_generations=2)
SENDERS = {"a", "b"}


def rollout(prompt_id=0, tokens=(1, 2), logprobs=None, version=3, rid=None, prompt=(9, 9, 9)):
    logprobs = [-0.5] * len(tokens) if logprobs is None else logprobs
    return Sample(sample_id=rid or f"r{prompt_id}-{tokens}-{version}", prompt_id=prompt_id, prompt_ids=list(prompt),
                   response_ids=list(tokens), behaviour_logp=logprobs, policy_versions=version,
                   finish_reason="stop", generation_time=0.1)


def intake(min_version=2):
    it = Intake(LIMITS)
    it.issue(0, {0: [5, 6], 1: [7]}, min_policy_version=min_version, now=0.0)
    it.issue(1, {2: [8]}, min_policy_version=min_version + 1, now=0.0)
    return it


@pytest.mark.parametrize("kwargs, reason", [
    (dict(tokens=()), "empty_response"),
    (dict(tokens=(1, 2, 3, 4, 5)), "too_long"),
    (dict(tokens=(1, 10)), "token_out_of_range"),
    (dict(tokens=(-1, 2)), "token_out_of_range"),
    (dict(tokens=(1, 2), logprobs=[-0.1, float("nan")]), "bad_logprob"),
    (dict(tokens=(1, 2), logprobs=[-0.1, float("-inf")]), "bad_logprob"),
    (dict(tokens=(1, 2), logprobs=[-0.1, 0.2]), "bad_logprob"),
    (dict(version=1), "stale_version"),
    (dict(version=6), "future_version"),
    (dict(tokens=(0, 9, 9, 9), logprobs=[0.0, -1.0, -2.0, -3.0], version=2), None),  # the edges are allowed
])
def test_content_rules(kwargs, reason):
    assert check_content(rollout(**kwargs), LIMITS, min_version=2, trainer_version=5) == reason


def test_logprobs_of_another_length_are_dropped():
    r = rollout(tokens=(1, 2))
    r.behaviour_logp = torch.tensor([-0.1, -0.2, -0.3])  # a Sample refuses this on construction; the rule still holds
    assert check_content(r, LIMITS, 0, 5) == "logprob_length"


def test_accepted_rollout_carries_the_trainers_prompt_tokens():
    it = intake()
    got = it.offer(rollout(prompt_id=0, prompt=(1, 1, 1, 1)), "a", SENDERS, trainer_version=3)
    assert got is not None and got.prompt_ids.tolist() == [5, 6]
    assert it.received(0) == 1 and not it.dropped


def test_with_an_environment_the_rollouts_own_prompt_is_kept_and_a_group_is_one_prompt():
    it = Intake(IntakeLimits(vocab_size=10, response_length=4, num_generations=2, env_prompt_tokens=3))
    it.issue(0, {0: [5, 6]}, min_policy_version=2, now=0.0)
    for prompt, reason in (((), "bad_prompt"), ((1, 2, 3, 4), "bad_prompt"), ((1, 10), "bad_prompt")):
        assert it.offer(rollout(prompt=prompt), "a", SENDERS, trainer_version=3) is None and it.dropped[reason]
    got = it.offer(rollout(prompt=(1, 2, 3), rid="x"), "a", SENDERS, trainer_version=3)
    assert got.prompt_ids.tolist() == [1, 2, 3]  # the environment's opening, not the trainer's tokens
    assert it.offer(rollout(prompt=(1, 2), rid="y"), "a", SENDERS, trainer_version=3) is None
    assert it.dropped["prompt_mismatch"] == 1
    assert it.offer(rollout(prompt=(1, 2, 3), rid="z"), "a", SENDERS, trainer_version=3) is not None
    assert it.complete(0)


@pytest.mark.parametrize("sender, prompt_id, reason", [("mallory", 0, "unknown_sender"), ("a", 99, "unknown_prompt"),
                                                       ("a", -1, "unknown_prompt")])
def test_unknown_sender_or_prompt_is_dropped(sender, prompt_id, reason):
    it = intake()
    assert it.offer(rollout(prompt_id=prompt_id), sender, SENDERS, 3) is None
    assert it.dropped == {reason: 1}


def test_staleness_window_is_the_prompts_own():
    it = intake(min_version=2)
    assert it.offer(rollout(prompt_id=2, version=2), "a", SENDERS, 5) is None  # step 1 needs >= 3
    assert it.offer(rollout(prompt_id=2, version=3), "a", SENDERS, 5) is not None
    assert it.dropped == {"stale_version": 1}


def test_duplicates_too_many_and_wrong_holder():
    it = intake()
    first = rollout(prompt_id=0, tokens=(1,), rid="x")
    assert it.offer(first, "a", SENDERS, 3) is not None
    assert it.offer(first, "a", SENDERS, 3) is None  # the same rollout again
    assert it.offer(rollout(prompt_id=0, tokens=(2,)), "b", SENDERS, 3) is None  # a's prompt
    assert it.offer(rollout(prompt_id=0, tokens=(3,)), "a", SENDERS, 3) is not None
    assert it.offer(rollout(prompt_id=0, tokens=(4,)), "a", SENDERS, 3) is None  # a third for n = 2
    assert it.dropped == {"duplicate": 1, "wrong_holder": 1, "too_many": 1}


def test_step_completes_with_num_generations_per_prompt_and_later_rollouts_are_late():
    it = intake()
    for pid, tokens in ((0, (1,)), (0, (2,)), (1, (3,))):
        it.offer(rollout(prompt_id=pid, tokens=tokens), "a", SENDERS, 3)
    assert not it.complete(0)
    it.offer(rollout(prompt_id=1, tokens=(4,)), "b", SENDERS, 3)
    assert not it.complete(0)  # prompt 1 is held by a
    it.offer(rollout(prompt_id=1, tokens=(5,)), "a", SENDERS, 3)
    assert it.complete(0) and not it.complete(1)
    taken = it.take(0)
    assert [r.prompt_id for r in taken] == [0, 0, 1, 1]
    assert it.in_flight(0) == 0
    assert it.offer(rollout(prompt_id=1, tokens=(6,)), "a", SENDERS, 3) is None
    assert it.dropped["already_trained"] == 1
    with pytest.raises(ValueError, match="not complete"):
        it.take(1)


def test_lost_holder_prompts_are_reissued_and_its_late_rollouts_dropped():
    it = intake()
    it.offer(rollout(prompt_id=0, tokens=(1,)), "a", SENDERS, 3)  # a holds prompt 0 (1 of 2)
    it.offer(rollout(prompt_id=1, tokens=(1,)), "b", SENDERS, 3)
    it.offer(rollout(prompt_id=1, tokens=(2,)), "b", SENDERS, 3)  # b completed prompt 1
    assert it.held_by("a") == [0, 2]  # its incomplete prompt and the one nobody holds yet
    assert it.reissue(it.held_by("a"), now=5.0) == {0: {0: [5, 6]}, 1: {2: [8]}}
    assert it.reissued == 2 and it.received(0) == 2  # prompt 0's partial rollout is gone
    assert it.offer(rollout(prompt_id=0, tokens=(2,)), "a", SENDERS, 3) is None
    assert it.dropped == {"late": 1}
    assert it.offer(rollout(prompt_id=0, tokens=(7,)), "b", SENDERS, 3) is not None
    assert it.offer(rollout(prompt_id=0, tokens=(8,)), "b", SENDERS, 3) is not None
    assert it.complete(0)
    it.offer(rollout(prompt_id=1, tokens=(3,)), "b", SENDERS, 3)  # prompt 1 was complete: too many
    it.take(0)
    assert it.offer(rollout(prompt_id=0, tokens=(3,)), "a", SENDERS, 3) is None  # late, also once trained
    assert it.offer(rollout(prompt_id=1, tokens=(4,)), "b", SENDERS, 3) is None
    assert it.dropped == {"late": 2, "too_many": 1, "already_trained": 1}


def test_stalled_prompts_after_the_timeout():
    it = intake()
    it.offer(rollout(prompt_id=0, tokens=(1,)), "a", SENDERS, 3, now=4.0)  # a delivered 1 of 2 for prompt 0
    it.offer(rollout(prompt_id=1, tokens=(1,)), "a", SENDERS, 3, now=4.0)
    it.offer(rollout(prompt_id=1, tokens=(2,)), "a", SENDERS, 3, now=4.0)  # and completed prompt 1
    assert it.stalled(now=9.0, timeout_s=10.0) == []
    assert it.stalled(now=10.0, timeout_s=10.0) == [2]  # nobody took it
    assert it.stalled(now=14.0, timeout_s=10.0) == [0, 2]  # a stopped half-way through it
    it.reissue([2], now=14.0)
    assert it.stalled(now=20.0, timeout_s=10.0) == [0]


def test_issuing_a_prompt_twice_is_refused():
    it = intake()
    with pytest.raises(ValueError, match="prompt 2 of step 1 was issued before"):
        it.issue(1, {2: [1]}, 0, 0.0)


def _complete(it, pid, version, sender="a"):
    for k in range(LIMITS.num_generations):
        assert it.offer(rollout(prompt_id=pid, tokens=(k + 1,), version=version), sender, SENDERS, version) is not None


def test_streamed_steps_take_finished_groups_first_and_wait_for_due_ones():
    it = Intake(LIMITS)
    it.issue(0, {0: [5], 1: [6]}, min_policy_version=0, now=0.0)
    it.issue(1, {2: [7], 3: [8]}, min_policy_version=0, now=0.0)
    _complete(it, 3, 0)
    assert it.take_streamed(2, version=0, max_staleness=1) is None  # one complete group for a step of two
    _complete(it, 2, 0)
    taken = it.take_streamed(2, version=0, max_staleness=1)  # batch 1's groups, batch 0 still sampling
    assert [r.prompt_id for r in taken] == [2, 2, 3, 3]
    it.issue(2, {4: [9], 5: [9]}, min_policy_version=1, now=0.0)
    _complete(it, 4, 1)
    _complete(it, 5, 1)
    _complete(it, 0, 0)
    # at version 1, prompts 0 and 1 (handed out at version 0) are due: the step waits for prompt 1
    assert it.take_streamed(2, version=1, max_staleness=1) is None
    _complete(it, 1, 1)
    assert [r.prompt_id for r in it.take_streamed(2, version=1, max_staleness=1)] == [0, 0, 1, 1]
    assert it.offer(rollout(prompt_id=2, version=1), "a", SENDERS, 1) is None and it.dropped["already_trained"] == 1


def test_streamed_steps_do_not_take_ahead_what_would_overload_a_later_step():
    it = Intake(LIMITS)
    it.issue(0, {0: [5], 1: [5], 2: [5]}, min_policy_version=0, now=0.0)  # all due at version 3
    _complete(it, 2, 0)
    assert [r.prompt_id for r in it.take_streamed(1, version=0, max_staleness=3)] == [2, 2]
    it.issue(1, {3: [5]}, min_policy_version=1, now=0.0)  # due at version 4
    _complete(it, 3, 1)
    # prompts 0 and 1 still fit the steps at versions 2 and 3
    assert [r.prompt_id for r in it.take_streamed(1, version=1, max_staleness=3)] == [3, 3]
    it.issue(2, {4: [5]}, min_policy_version=2, now=0.0)  # due at version 5
    _complete(it, 4, 2)
    # taking prompt 4 now would leave two prompts due by version 3 for the one step there: the step waits
    assert it.take_streamed(1, version=2, max_staleness=3) is None
    _complete(it, 1, 2)
    assert [r.prompt_id for r in it.take_streamed(1, version=2, max_staleness=3)] == [1, 1]
    assert it.take_streamed(1, version=3, max_staleness=3) is None  # prompt 0 is due and still sampling
    with pytest.raises(RuntimeError, match="2 prompts are due at version 5"):
        it.take_streamed(1, version=5, max_staleness=3)  # a hand-out past the bound is a bug, said as one


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_streamed_runs_train_every_prompt_once_within_the_staleness_bound(max_staleness, seed):
    """The engine's hand-out (`max_staleness` batches ahead, at the step's version) with groups finishing in
    a random order: every step is taken, each prompt once, none older than the bound."""
    rng = torch.Generator().manual_seed(seed)
    per_step, steps = 3, 30
    it, issued, version_of, trained, next_batch = Intake(LIMITS), 0, {}, [], 0
    for step in range(steps):
        while next_batch < step + max_staleness:
            ids = {issued + j: [1] for j in range(per_step)}
            it.issue(next_batch, ids, min_policy_version=step, now=0.0)
            version_of.update({pid: step for pid in ids})
            issued, next_batch = issued + per_step, next_batch + 1
        while (taken := it.take_streamed(per_step, version=step, max_staleness=max_staleness)) is None:
            sampling = it.held_by("nobody")  # the incomplete prompts (a group completes at once here)
            _complete(it, sampling[int(torch.randint(len(sampling), (1,), generator=rng))], step)
        pids = sorted({r.prompt_id for r in taken})
        assert len(pids) == per_step and not set(pids) & set(trained)
        assert all(step - version_of[pid] <= max_staleness for pid in pids)
        trained += pids
    # every batch handed out by version steps-1-max_staleness (batches up to steps-2) was due by the last step
    assert sorted(trained)[: (steps - 1) * per_step] == list(range((steps - 1) * per_step))
