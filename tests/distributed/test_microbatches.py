"""One rank: a PPO update does not depend on how its minibatch is cut into micro-batches, because each
micro-batch adds sum(token losses) / (tokens of the whole minibatch) rather than its own token mean."""

import pytest

from rlhf_engine.distributed import Comm
from tests.distributed.workers import ppo_scenarios as scenarios


@pytest.mark.parametrize("scenario", ["gae", "grpo"])
def test_update_independent_of_micro_batch_split(scenario, monkeypatch):
    results = []
    for mini, accumulation in ((8, 1), (2, 4)):  # one optimizer step over all 8 samples, either way
        name = f"{scenario}_{mini}x{accumulation}"
        monkeypatch.setitem(scenarios.SCENARIOS, name, {**scenarios.SCENARIOS[scenario], "mini_batch_size": mini,
                                                        "gradient_accumulation_steps": accumulation})
        trainer = scenarios.make_trainer(Comm(), name)
        history = scenarios.run_steps(Comm(), trainer, scenario, range(scenarios.STEPS))
        results.append((scenarios.full_weights(trainer), history))
    (w_one, h_one), (w_four, h_four) = results
    assert max(float((w_one[k] - w_four[k]).abs().max()) for k in w_one) <= 1e-5
    for s1, s4 in zip(h_one, h_four):
        for key in ("ppo/loss/policy", "ppo/policy/approxkl", "ppo/grad_norm", "objective/kl"):
            assert s4[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-6), key
    # the old normalisation (mean of per-micro-batch token means) would differ: micro-batches of 2 rows
    # hold different token counts, so the test can fail
    assert h_one[0]["ppo/optimizer_steps"] == h_four[0]["ppo/optimizer_steps"] == 2.0
