"""PPOTrainer.step on tiny models: on-policy identities, early stop, KL control, off-policy weights, bad input."""

import math

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer import losses
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

B = 8


@pytest.fixture
def make_trainer(make_lm, tokenizer):
    def make(value_head=True, **overrides):
        kwargs = dict(batch_size=B, mini_batch_size=B, ppo_epochs=1, learning_rate=1e-3, response_length=6)
        kwargs.update(overrides)
        lm = make_lm(seed=0)
        model = AutoModelForCausalLMWithValueHead(lm) if value_head else lm
        return PPOTrainer(config=PPOConfig(**kwargs), model=model, tokenizer=tokenizer)

    return make


@pytest.fixture
def data(tokenizer, random_pairs):
    queries, responses = random_pairs(B, seed=7, eos=tokenizer.eos_token_id)
    scores = torch.linspace(-1.0, 1.0, B)
    return queries, responses, scores


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_on_policy_single_minibatch_has_ratio_one(make_trainer, data):
    trainer = make_trainer()
    stats = trainer.step(*data)
    # one epoch, one minibatch: the loss is evaluated before any update, so pi == pi_old
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/policy/clipfrac"] == 0.0
    assert stats["ppo/policy/approxkl"] < 1e-10 and abs(stats["ppo/policy/approxkl_k3"]) < 1e-6
    assert stats["ppo/val/clipfrac"] == 0.0
    assert stats["ppo/optimizer_steps"] == 1.0 and stats["ppo/skipped"] == 0.0
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is a copy of the policy
    assert trainer.policy_version == 1
    for key in ("objective/kl_coef", "objective/entropy", "ppo/loss/policy", "ppo/loss/value", "ppo/returns/mean",
                "ppo/val/error", "ppo/val/explained_variance", "env/reward_mean", "env/reward_std", "time/ppo/forward_pass",
                "time/ppo/optimize_step", "time/ppo/total", "time/ppo/tokens_per_second"):
        assert math.isfinite(stats[key]), key
    assert stats["env/reward_mean"] == pytest.approx(0.0, abs=1e-6)


def test_step_updates_policy_and_leaves_reference(make_trainer, data):
    trainer = make_trainer()
    ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    before = _weights(trainer)
    trainer.step(*data)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.ref_model.state_dict().items())
    stats = trainer.step(*data)
    assert stats["objective/kl"] != 0.0  # the policy moved away from the reference


def test_target_kl_stops_epochs_early(make_trainer, data):
    # 4 epochs x 2 minibatches = 8 optimizer steps; the second one sees approxkl > 1e-9 and stops
    trainer = make_trainer(mini_batch_size=4, ppo_epochs=4, learning_rate=1e-2, target_kl=1e-9)
    stats = trainer.step(*data)
    assert stats["ppo/early_stop"] == 1.0
    assert stats["ppo/optimizer_steps"] == 2.0
    full = make_trainer(mini_batch_size=4, ppo_epochs=4, learning_rate=1e-2).step(*data)
    assert full["ppo/optimizer_steps"] == 8.0 and full["ppo/early_stop"] == 0.0


def test_gradient_accumulation_counts_optimizer_steps(make_trainer, data):
    # batch 8 = 2 slices of 2 x 2 accumulation -> 2 optimizer steps per epoch, 3 epochs -> 6
    stats = make_trainer(mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=3).step(*data)
    assert stats["ppo/optimizer_steps"] == 6.0


def test_adaptive_kl_coef_moves_towards_target(make_trainer, data):
    trainer = make_trainer(init_kl_coef=0.2, target=6.0, horizon=80.0)
    stats = trainer.step(*data)
    # KL = 0 < target: error = clip(0/6 - 1) = -0.2 ; beta = 0.2 * (1 - 0.2 * 8 / 80) = 0.196
    assert stats["objective/kl_coef"] == pytest.approx(0.2)
    assert trainer.kl_ctl.value == pytest.approx(0.196)
    fixed = make_trainer(init_kl_coef=0.2, adap_kl_ctrl=False)
    fixed.step(*data)
    assert fixed.kl_ctl.value == 0.2


def test_off_policy_importance_weights(make_trainer, data, tokenizer):
    queries, responses, scores = data
    trainer = make_trainer(tis_cap=2.0)
    batch = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        logp = forward_policy(trainer.model, batch, 1.0).logp
    own = [logp[i, : len(r)] for i, r in enumerate(responses)]
    stats = trainer.step(queries, responses, scores, behaviour_logprobs=own, policy_versions=[0] * B)
    # the sampler agrees with the trainer: weights 1, no truncation, staleness 0
    assert stats["off_policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["off_policy/is_truncated_fraction"] == 0.0
    assert stats["off_policy/staleness_mean"] == 0.0
    # a sampler that found every token e^5 times less likely: w = min(e^5, 2) = 2 everywhere
    trainer = make_trainer(tis_cap=2.0)
    stats = trainer.step(queries, responses, scores, behaviour_logprobs=[x - 5.0 for x in own])
    assert stats["off_policy/is_weight_mean"] == pytest.approx(2.0)
    assert stats["off_policy/is_truncated_fraction"] == 1.0
    assert stats["off_policy/behaviour_kl"] == pytest.approx(5.0, abs=1e-4)


def test_staleness_counts_versions(make_trainer, data):
    trainer = make_trainer()
    trainer.step(*data)
    stats = trainer.step(*data, policy_versions=[0] * 4 + [1] * 4)
    # the trainer was at version 1: staleness (1, 1, 1, 1, 0, 0, 0, 0)
    assert stats["off_policy/staleness_mean"] == 0.5 and stats["off_policy/staleness_max"] == 1.0
    with pytest.raises(ValueError, match="policy_versions must lie in"):
        trainer.step(*data, policy_versions=[5] * B)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_non_finite_score_drops_its_sample_and_the_step_goes_on(make_trainer, data, estimator, tokenizer):
    queries, responses, scores = data
    groups = dict(num_generations=4, value_head=False) if estimator == "grpo" else {}
    grouped = [queries[0]] * 4 + [queries[1]] * 4
    bad = scores.clone()
    bad[3] = float("nan")
    trainer = make_trainer(advantage_estimator=estimator, **groups)
    with pytest.warns(RuntimeWarning, match=r"non-finite scores at samples \[3\] \(given scores\): dropped"):
        stats = trainer.step(grouped, responses, bad)
    assert stats["ppo/skipped"] == 0.0 and trainer.policy_version == 1
    assert stats["env/nonfinite_rewards"] == 1.0
    # the mean of the 7 finite scores of linspace(-1, 1, 8) without index 3 (-1/7): (0 + 1/7) / 7
    assert stats["env/reward_mean"] == pytest.approx((1 / 7) / 7, abs=1e-6)
    # the dropped sample contributes nothing: another response in its place gives the same weights
    other = make_trainer(advantage_estimator=estimator, **groups)
    swapped = list(responses)
    swapped[3] = torch.tensor([5, 6, 7, tokenizer.eos_token_id])
    with pytest.warns(RuntimeWarning):
        other.step(grouped, swapped, bad)
    for (name, a), b in zip(trainer.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_non_finite_reward_fn_scores_name_the_setting(make_lm, tokenizer, data):
    queries, responses, _ = data

    def shaky(prompts, completions):  # NaN for the first completion, 1.0 for the others
        return [math.nan] + [1.0] * (len(completions) - 1)

    trainer = PPOTrainer(config=PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=1, response_length=6,
                                          advantage_estimator="reinforce_pp"),
                         model=make_lm(), tokenizer=tokenizer, reward_fn=shaky)
    with pytest.warns(RuntimeWarning, match=r"samples \[0\] \(model.reward_fn\): dropped from this step"):
        stats = trainer.step(queries, responses)
    assert stats["env/nonfinite_rewards"] == 1.0 and stats["env/reward_mean"] == 1.0 and trainer.policy_version == 1


def test_only_non_finite_scores_skip_step_and_keep_weights(make_trainer, data):
    queries, responses, scores = data
    trainer = make_trainer()
    before = _weights(trainer)
    with pytest.warns(RuntimeWarning, match="every sample; step skipped"):
        stats = trainer.step(queries, responses, torch.full((B,), float("inf")))
    assert stats["ppo/skipped"] == 1.0 and trainer.policy_version == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_non_finite_loss_skips_update(make_trainer, data, monkeypatch):
    trainer = make_trainer()
    before = _weights(trainer)

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    real = losses.ppo_policy_loss
    monkeypatch.setattr(losses, "ppo_policy_loss", nan_loss)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        stats = trainer.step(*data)
    assert stats["ppo/skipped"] == 1.0 and stats["ppo/optimizer_steps"] == 0.0
    assert trainer.kl_ctl.value == trainer.config.init_kl_coef
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_non_finite_gradient_late_in_the_update_undoes_the_earlier_optimizer_steps(make_trainer, data, monkeypatch):
    # 2 epochs x 2 backward batches = 4 optimizer steps; the loss turns NaN at the 3rd (after 2 were applied)
    trainer = make_trainer(mini_batch_size=B // 2, ppo_epochs=2)
    before = _weights(trainer)
    opt_before = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"].get(0, {}).items()}
    calls = []

    def nan_late(logp, *args, **kwargs):  # NaN gradients for every log-prob (a NaN loss alone may be masked)
        loss, stats = real(logp, *args, **kwargs)
        calls.append(1)
        return (loss + (logp * float("nan")).sum() if len(calls) == 3 else loss), stats

    real = losses.ppo_policy_loss
    monkeypatch.setattr(losses, "ppo_policy_loss", nan_late)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient norm: update stopped and undone"):
        stats = trainer.step(*data)
    assert len(calls) == 3
    assert stats["ppo/skipped"] == 1.0 and stats["ppo/optimizer_steps"] == 0.0 and trainer.policy_version == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict()["state"].get(0, {}).keys() == opt_before.keys()  # Adam moments as before
    # and the next step trains as the first would have: one more try gives the un-monkeypatched result
    monkeypatch.setattr(losses, "ppo_policy_loss", real)
    fresh = make_trainer(mini_batch_size=B // 2, ppo_epochs=2)
    fresh._shuffle.set_state(trainer._shuffle.get_state())
    trainer.step(*data)
    fresh.step(*data)
    for k, v in fresh.model.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[k], v, atol=1e-6), k


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, r, s: (q[:-1], r, s), "got 7 queries but 8 responses"),
        (lambda q, r, s: (q[:4], r[:4], s[:4]), r"step got 4 samples; config.batch_size is 8"),
        (lambda q, r, s: (q, r[:-1] + [torch.tensor([], dtype=torch.long)], s), r"responses\[7\] is empty"),
        (lambda q, r, s: (q, r, s[:5]), "got 5 scores for 8 samples"),
        (lambda q, r, s: (q, [x.float() for x in r], s), r"responses\[0\] must hold integer token ids"),
        (lambda q, r, s: (q, [x[None] for x in r], s), r"responses\[0\] must be a 1-D token sequence"),
    ],
)
def test_bad_input_is_named(make_trainer, data, mutate, message):
    trainer = make_trainer()
    with pytest.raises(ValueError, match=message):
        trainer.step(*mutate(*data))


def test_bad_behaviour_logprobs(make_trainer, data):
    queries, responses, scores = data
    trainer = make_trainer()
    short = [torch.zeros(len(r) + 1) for r in responses]
    with pytest.raises(ValueError, match=r"behaviour_logprobs\[0\] has shape"):
        trainer.step(queries, responses, scores, behaviour_logprobs=short)
    nan = [torch.full((len(r),), float("nan")) for r in responses]
    with pytest.raises(ValueError, match="non-finite"):
        trainer.step(queries, responses, scores, behaviour_logprobs=nan)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_train_a_plain_lm(make_trainer, data, estimator):
    queries, responses, scores = data
    groups = dict(num_generations=4) if estimator != "reinforce_pp" else {}
    trainer = make_trainer(value_head=False, advantage_estimator=estimator, **groups)
    grouped_queries = [queries[0]] * 4 + [queries[1]] * 4
    stats = trainer.step(grouped_queries, responses, scores)
    assert stats["ppo/optimizer_steps"] == 1.0 and "ppo/loss/value" not in stats
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    if estimator != "reinforce_pp":
        with pytest.raises(ValueError, match=r"queries\[1\] differs from queries\[0\]"):
            trainer.step(queries, responses, scores)


def test_gae_needs_a_critic(make_lm, tokenizer):
    with pytest.raises(ValueError, match="needs a critic"):
        PPOTrainer(config=PPOConfig(batch_size=B, mini_batch_size=B), model=make_lm(), tokenizer=tokenizer)


def test_separate_critic_is_trained(make_lm, tokenizer, data):
    critic = AutoModelForCausalLMWithValueHead(make_lm(seed=9))
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=2, learning_rate=1e-2, response_length=6)
    trainer = PPOTrainer(config=cfg, model=make_lm(), tokenizer=tokenizer, value_model=critic)
    head = critic.v_head.summary.weight.clone()
    stats = trainer.step(*data)
    assert not torch.equal(head, critic.v_head.summary.weight)
    assert math.isfinite(stats["ppo/loss/value"])


def test_full_kl_penalty(make_trainer, data):
    trainer = make_trainer(kl_penalty="full", learning_rate=1e-2)
    assert trainer.step(*data)["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert trainer.step(*data)["objective/kl"] > 0.0  # exact KL is >= 0 and the policy moved


def test_reward_fn_scores_when_none_given(make_lm, tokenizer, data):
    queries, responses, _ = data
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=1)
    trainer = PPOTrainer(config=cfg, model=AutoModelForCausalLMWithValueHead(make_lm()), tokenizer=tokenizer,
                         reward_fn=lambda prompts, completions: [float(len(c)) for c in completions])
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    stats = trainer.step(queries, responses)
    assert stats["env/reward_mean"] == pytest.approx(sum(len(c) for c in completions) / B)


def test_reward_model_scores_when_none_given(make_lm, make_reward_model, tokenizer, data):
    from rlhf_engine.models.reward_scoring import model_scores

    queries, responses, _ = data
    cfg = PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=1, frozen_dtype="bfloat16")
    trainer = PPOTrainer(config=cfg, model=AutoModelForCausalLMWithValueHead(make_lm()), tokenizer=tokenizer,
                         reward_model=make_reward_model())
    assert next(trainer.reward_model.parameters()).dtype == torch.bfloat16  # frozen models cast
    assert next(trainer.ref_model.parameters()).dtype == torch.bfloat16
    batch = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    expected = model_scores(trainer.reward_model, batch.input_ids, batch.attention_mask, batch.position_ids)
    # chunked by 4 and packed = all at once padded, up to bf16 rounding (packed rows sum in another order;
    # one bf16 ulp is 2^-8 relative)
    torch.testing.assert_close(trainer.score(queries, responses), expected, rtol=8e-3, atol=2e-3)
    stats = trainer.step(queries, responses)
    assert stats["env/reward_mean"] == pytest.approx(float(expected.mean()), abs=2e-3)


def test_generate_returns_responses_cut_after_eos(make_trainer, tokenizer):
    trainer = make_trainer(response_length=5)
    queries = [torch.tensor([10, 11, 12]), torch.tensor([20])]
    responses = trainer.generate(queries)
    assert len(responses) == 2
    for r in responses:
        assert 1 <= len(r) <= 5
        eos = (r == tokenizer.eos_token_id).nonzero()
        assert eos.numel() == 0 or int(eos[0, 0]) == len(r) - 1
    single = trainer.generate(torch.tensor([10, 11]), max_new_tokens=3)
    assert isinstance(single, torch.Tensor) and 1 <= len(single) <= 3


def test_trainer_state_round_trip(make_trainer, data):
    trainer = make_trainer(init_kl_coef=0.3, horizon=100.0)
    trainer.step(*data)
    other = make_trainer(init_kl_coef=0.3, horizon=100.0)
    other.load_state_dict(trainer.state_dict())
    assert other.kl_ctl.value == trainer.kl_ctl.value and other.policy_version == 1
    names = trainer.policy_state_dict().keys()
    assert names == trainer.model.pretrained_model.state_dict().keys()


def test_trl_dataloader_loop_trains_on_full_batches_only(make_lm, tokenizer, tmp_path):
    from rlhf_engine import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # the public names

    AutoModelForCausalLMWithValueHead(make_lm()).save_pretrained(tmp_path / "sft_model")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "sft_model")
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "sft_model")
    config = PPOConfig(learning_rate=1e-5, batch_size=16, mini_batch_size=4, gradient_accumulation_steps=4,
                       ppo_epochs=4, kl_penalty="kl", init_kl_coef=0.2, target_kl=6.0, response_length=4)
    dataset = [{"input_ids": tokenizer(f"the cat likes {i}")["input_ids"]} for i in range(20)]
    trainer = PPOTrainer(model=model, ref_model=ref_model, config=config, tokenizer=tokenizer, dataset=dataset)
    batches = 0
    for batch in trainer.dataloader:
        responses = trainer.generate(batch["input_ids"])
        scores = [torch.tensor(float(len(r))) for r in responses]
        stats = trainer.step(batch["input_ids"], responses, scores)
        batches += 1
    assert batches == 1  # 20 samples, batch_size 16, last partial batch dropped
    assert stats["ppo/optimizer_steps"] == 4.0  # 4 epochs x one backward batch of 4 x 4


def test_linear_schedule_steps_once_per_ppo_step(make_trainer, data):
    trainer = make_trainer(learning_rate=1e-3, lr_scheduler_type="linear", total_steps=4, mini_batch_size=4)
    first = trainer.step(*data)
    # the step trains at lr 1e-3 (2 optimizer steps), then the schedule moves to 1e-3 * (1 - 1/4)
    assert first["ppo/learning_rate"] == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-4)


def test_resume_from_state_is_bit_exact(make_trainer, data):
    import json

    from rlhf_engine.common.checkpoint import flatten_state, unflatten_state

    # A: two steps in a row; B: a fresh trainer given A's weights and state after step 1, then step 2
    a = make_trainer(mini_batch_size=4, ppo_epochs=2, init_kl_coef=0.1, horizon=50.0)
    a.step(*data)
    tree, tensors = flatten_state(a.state_dict())
    saved_state = unflatten_state(json.loads(json.dumps(tree)), {k: v.clone() for k, v in tensors.items()})
    saved_weights = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.step(*data)
    b = make_trainer(mini_batch_size=4, ppo_epochs=2, init_kl_coef=0.1, horizon=50.0)
    b.model.load_state_dict(saved_weights)
    b.load_state_dict(saved_state)
    b.step(*data)
    assert b.policy_version == a.policy_version == 2 and b.kl_ctl.value == a.kl_ctl.value
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name


def test_score_clip_and_missing_eos_penalty_shape_scores(make_trainer, data):
    queries, responses, scores = data  # scores linspace(-1, 1, 8); responses 0, 2, 4, 6 end with EOS
    stats = make_trainer(score_clip=0.5, missing_eos_penalty=1.0).step(queries, responses, scores)
    clipped = scores.clamp(-0.5, 0.5)
    penalised = clipped - torch.tensor([0.0, 1.0] * 4)  # the 4 responses without EOS lose 1.0
    assert stats["objective/scores"] == pytest.approx(float(penalised.mean()), abs=1e-6)
    assert stats["env/reward_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)  # raw scores reported
    assert stats["tokens/eos_fraction"] == 0.5



def test_trainer_leaves_the_global_rng_untouched(make_lm, tokenizer, data):
    queries, _, scores = data
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
    config = PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3, response_length=6, seed=3)
    state = torch.random.get_rng_state()
    trainer = PPOTrainer(config=config, model=model, tokenizer=tokenizer)
    responses = trainer.generate(queries)
    trainer.step(queries, responses, scores)
    assert torch.equal(torch.random.get_rng_state(), state)
    # sampling draws from the trainer's own seeded generator: the same seed samples the same responses
    again = PPOTrainer(config=config, model=AutoModelForCausalLMWithValueHead(make_lm(seed=0)), tokenizer=tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(again.generate(queries), responses))


@pytest.mark.parametrize("packing", [True, False])
def test_a_minibatch_of_only_dropped_samples_takes_no_step_and_the_update_goes_on(make_trainer, data, packing):
    queries, responses, scores = data
    bad = scores.clone()
    bad[: B - 1] = float("nan")  # every optimizer step but one sees only dropped samples
    trainer = make_trainer(mini_batch_size=1, gradient_accumulation_steps=1, packing=packing)  # B steps of one row
    before = _weights(trainer)
    with pytest.warns(RuntimeWarning, match="dropped from this step"):
        stats = trainer.step(queries, responses, bad)
    assert stats["ppo/skipped"] == 0.0 and stats["ppo/optimizer_steps"] == float(B)
    assert trainer.policy_version == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
