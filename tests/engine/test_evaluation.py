"""Held-out evaluation pieces without processes: the metrics on hand-computed scores, and the round's rules."""

import pytest
import torch

from rlhf_engine.engine.evaluation import EvalRound, eval_metrics
from rlhf_engine.engine.intake import IntakeLimits
from rlhf_engine.transport import Sample

LIMITS = IntakeLimits(vocab_size=10, response_length=4, num_generations=2)


def test_eval_metrics_by_hand():
    # 3 prompts x k = 2 samples; gold passes: prompt 0 [1, 0] -> yes, prompt 1 [0, 0] -> no, prompt 2 [0, 1] -> yes
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.0, float("nan"), 1.5])
    gold = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    lengths = torch.tensor([1, 2, 3, 4, 4, 4])
    prompt_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    stats = eval_metrics(rewards, gold, lengths, prompt_ids, torch.full((6,), 7))
    assert stats == {
        "eval/reward_mean": pytest.approx((0.5 - 1.0 + 2.0 + 0.0 + 1.5) / 5),  # the NaN left out and counted
        "eval/nonfinite_rewards": 1.0,
        "eval/pass@2": pytest.approx(2 / 3),
        "eval/response_length_mean": 18 / 6,
        "eval/policy_version": 7.0,
        "eval/samples": 6.0,
        "eval/gold_mean": pytest.approx(2 / 6),
    }
    # no gold function: the reward decides (> 0; NaN does not pass): prompt 0 yes, 1 yes, 2 yes (1.5)
    assert eval_metrics(rewards, None, lengths, prompt_ids, torch.zeros(6))["eval/pass@2"] == 1.0
    assert "eval/gold_mean" not in eval_metrics(rewards, None, lengths, prompt_ids, torch.zeros(6))
    # k = 1, nothing passes
    assert eval_metrics(torch.zeros(2), None, torch.ones(2), torch.tensor([0, 1]), torch.zeros(2))["eval/pass@1"] == 0.0


def rollout(prompt_id, sender="a", rid=None, tokens=(1, 2), version=3, eval=True):
    return Sample(sample_id=rid or f"{sender}/{prompt_id}/{tokens}", prompt_id=prompt_id, prompt_ids=[0],
                   response_ids=list(tokens), behaviour_logp=[-0.5] * len(tokens), policy_versions=version,
                   finish_reason="stop", generation_time=0.1, eval=eval, sender=sender)


def test_the_round_batches_its_prompts_and_accepts_by_the_rules():
    prompts = [[5], [6, 7], [8]]
    rnd = EvalRound(prompts, samples=2, temperature=0.0, version=3, limits=LIMITS, max_batch_prompts=2, now=0.0)
    assert [(b.batch_id, b.prompt_ids, b.prompts, b.min_policy_version, b.eval_samples) for b in rnd.batches] == [
        (-1, [0, 1], [[5], [6, 7]], 3, 2), (-2, [2], [[8]], 3, 2)]
    senders = {"a", "b"}
    cases = [(rollout(0, sender="x"), "unknown_sender"), (rollout(3), "unknown_prompt"),
             (rollout(0, eval=False), "unknown_prompt"), (rollout(0, version=2), "stale_version"),
             (rollout(0, version=4), "future_version"), (rollout(0, tokens=(1, 10)), "token_out_of_range")]
    for r, reason in cases:
        before = rnd.dropped[reason]
        assert not rnd.offer(r, senders, 1.0) and rnd.dropped[reason] == before + 1, reason
    assert rnd.offer(rollout(0, rid="s0"), senders, 1.0)
    assert not rnd.offer(rollout(0, rid="s0"), senders, 1.0) and rnd.dropped["duplicate"] == 1
    assert not rnd.offer(rollout(0, sender="b"), senders, 1.0) and rnd.dropped["late"] == 1  # a holds prompt 0
    assert rnd.offer(rollout(0, rid="s1"), senders, 1.0)
    assert not rnd.offer(rollout(0, rid="s2"), senders, 1.0) and rnd.dropped["too_many"] == 1
    assert not rnd.complete()
    with pytest.raises(ValueError, match="not complete"):
        rnd.samples()
    # prompt 1 got one sample, prompt 2 none: after the timeout both go out again, under their batches' ids
    assert rnd.offer(rollout(1, rid="p1"), senders, 2.0)
    assert rnd.stalled(now=5.0, timeout_s=10.0) == []
    again = rnd.stalled(now=12.5, timeout_s=10.0)
    assert [(b.batch_id, b.prompt_ids, b.prompts) for b in again] == [(-1, [1], [[6, 7]]), (-2, [2], [[8]])]
    assert rnd.reissued == 2
    assert not rnd.offer(rollout(1, rid="p1b"), senders, 13.0)  # the old holder is late now
    for i, pid in enumerate((1, 1, 2, 2)):
        assert rnd.offer(rollout(pid, sender="b", rid=f"b{i}"), senders, 13.0)
    assert rnd.complete()
    samples = rnd.samples()
    assert [r.prompt_id for r in samples] == [0, 0, 1, 1, 2, 2]
    assert [r.prompt_ids.tolist() for r in samples[::2]] == prompts  # the trainer's tokens, not the wire's
