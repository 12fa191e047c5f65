"""No redundant forward passes: each model's forward calls per PPO step, counted with forward hooks."""

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

B = 8


class Counter:
    def __init__(self, module):
        self.calls = 0
        self.grad_enabled = []
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())


def _step(make_lm, tokenizer, random_pairs, *, versions=None, critic=False, ref_seed=None, **overrides):
    # one optimizer step of 2 micro-batches of 4
    kwargs = dict(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=1, learning_rate=1e-3,
                  advantage_estimator="grpo",
                  num_generations=2, init_kl_coef=0.0, adap_kl_ctrl=False)
    kwargs.update(overrides)
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
    value_model = AutoModelForCausalLMWithValueHead(make_lm(seed=1)) if critic else None
    ref_model = make_lm(seed=ref_seed) if ref_seed is not None else None
    trainer = PPOTrainer(PPOConfig(**kwargs), model, ref_model, tokenizer=tokenizer, value_model=value_model)
    trainer.policy_version = 3
    counts = {"policy": Counter(model.pretrained_model), "ref": Counter(trainer.ref_model)}
    if critic:
        counts["critic"] = Counter(value_model.pretrained_model)
    queries, responses = random_pairs(B, seed=2, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]
    stats = trainer.step(queries, responses, torch.linspace(-1, 1, B), policy_versions=versions)
    return counts, stats


@pytest.mark.parametrize("versions", [[3] * B, [3] * (B - 1) + [2]], ids=["on_policy", "stale_sample"])
def test_one_optimizer_step_without_kl_reuses_the_update_forward(make_lm, tokenizer, random_pairs, versions):
    counts, stats = _step(make_lm, tokenizer, random_pairs, versions=versions, ref_seed=5)
    # 2 micro-batches of 4: the policy runs only in the update (with grad); the reference twice, no grad
    assert counts["policy"].calls == 2 and all(counts["policy"].grad_enabled)
    assert counts["ref"].calls == 2 and not any(counts["ref"].grad_enabled)
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-6)  # pi_old is that forward, detached
    assert stats["ppo/policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert abs(stats["objective/kl"]) > 1e-3


def test_reused_forward_equals_a_separate_old_logprob_pass(make_lm, tokenizer, random_pairs, monkeypatch):
    # stale samples with the sampler's log-probs (importance weights): the step with pi_old taken from the
    # update's forward gives the weights and stats of the step with a separate experience pass
    import rlhf_engine.trainer.ppo.trainer as ppo_module

    queries, responses = random_pairs(B, seed=2, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]
    g = torch.Generator().manual_seed(4)
    behaviour = [-torch.rand(len(r), generator=g) * 3 for r in responses]
    runs = []
    for separate in (False, True):
        if separate:
            monkeypatch.setattr(ppo_module, "old_logp_from_update", lambda *args: False)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=1,
                        learning_rate=1e-3, advantage_estimator="grpo", num_generations=2, init_kl_coef=0.0)
        trainer = PPOTrainer(cfg, model, make_lm(seed=5), tokenizer=tokenizer,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        trainer.policy_version = 3
        counts = Counter(model.pretrained_model)
        stats = trainer.step(queries, responses, torch.linspace(-1, 1, B), behaviour_logprobs=behaviour,
                             policy_versions=[2] * B)
        assert counts.calls == (4 if separate else 2)
        runs.append((stats, {k: v.clone() for k, v in model.state_dict().items()}))
    (reused, w0), (kept, w1) = runs
    for key in ("ppo/loss/policy", "objective/kl", "off_policy/is_weight_mean", "ppo/grad_norm", "ppo/policy/ratio"):
        assert reused[key] == pytest.approx(kept[key], rel=1e-5, abs=1e-7), key
    assert reused["off_policy/is_weight_mean"] != 1.0
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["kl_in_rewards", "two_epochs", "two_optimizer_steps"])
def test_old_logprob_pass_kept_when_needed(make_lm, tokenizer, random_pairs, case):
    overrides = {"kl_in_rewards": dict(init_kl_coef=0.1), "two_epochs": dict(ppo_epochs=2),
                 "two_optimizer_steps": dict(gradient_accumulation_steps=1)}[case]
    versions = [3] * B
    counts, _ = _step(make_lm, tokenizer, random_pairs, versions=versions, **overrides)
    epochs = overrides.get("ppo_epochs", 1)
    assert counts["policy"].grad_enabled == [False, False] + [True, True] * epochs
    assert counts["ref"].calls == 2


def test_shared_trunk_gives_logits_and_values_in_one_forward(make_lm, tokenizer, random_pairs):
    counts, stats = _step(make_lm, tokenizer, random_pairs, advantage_estimator="gae", init_kl_coef=0.1)
    # experience: one pass per micro-batch gives log-probs and values; update: one per micro-batch
    assert counts["policy"].grad_enabled == [False, False, True, True]
    assert "ppo/loss/value" in stats


def test_separate_critic_and_no_kl_skips_the_policy_pass(make_lm, tokenizer, random_pairs):
    counts, _ = _step(make_lm, tokenizer, random_pairs, advantage_estimator="gae", critic=True)
    assert counts["policy"].grad_enabled == [True, True]
    assert counts["critic"].grad_enabled == [False, False, True, True]


def test_reused_pass_still_weights_off_sampler_tokens(make_lm, tokenizer, random_pairs):
    from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch

    model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
    cfg = PPOConfig(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=1, learning_rate=1e-3,
                    advantage_estimator="grpo", num_generations=2, init_kl_coef=0.0, adap_kl_ctrl=False, tis_cap=2.0)
    trainer = PPOTrainer(cfg, model, tokenizer=tokenizer)
    queries, responses = random_pairs(B, seed=2, eos=tokenizer.eos_token_id)
    queries = [queries[i - i % 2] for i in range(B)]
    batch = make_token_batch(queries, responses, trainer.pad_token_id, trainer.eos_token_ids)
    with torch.no_grad():
        logp = forward_policy(model, batch, 1.0).logp
    # the sampler's log-probs 0.1 below the policy's: every weight is min(exp(0.1), 2) = 1.10517
    lengths = batch.response_mask.sum(dim=1).long().tolist()
    behaviour = [logp[i, :n] - 0.1 for i, n in enumerate(lengths)]
    cut = [r[:n] for r, n in zip(responses, lengths)]
    stats = trainer.step(queries, cut, torch.linspace(-1, 1, B), behaviour_logprobs=behaviour,
                         policy_versions=[0] * B)
    assert stats["off_policy/behaviour_kl"] == pytest.approx(0.1, abs=1e-5), stats
    assert stats["off_policy/is_weight_mean"] == pytest.approx(1.10517, abs=1e-4)
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-6)
