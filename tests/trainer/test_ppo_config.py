"""PPOConfig validation: TRL's batch arithmetic and the choices, with messages that show the values."""

import pytest

from rlhf_engine.trainer.ppo.config import PPOConfig


def test_issue_example_config_is_valid():
    cfg = PPOConfig(learning_rate=1e-5, batch_size=16, mini_batch_size=4, gradient_accumulation_steps=4,
                    ppo_epochs=4, kl_penalty="kl", init_kl_coef=0.2, target_kl=6.0)
    assert cfg.backward_batch_size == 16  # 4 * 4: one optimizer step per epoch


def test_batch_size_must_divide_into_backward_batches():
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be divisible by .* \(4 \* 1 = 4\)"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match=r"\(4 \* 2 = 8\)"):
        PPOConfig(batch_size=12, mini_batch_size=4, gradient_accumulation_steps=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kl_penalty="kl2"), r"kl_penalty \('kl2'\) must be one of"),
        (dict(advantage_estimator="ppo"), r"advantage_estimator \('ppo'\)"),
        (dict(advantage_estimator="grpo", batch_size=8, mini_batch_size=8), r"num_generations >= 2 \(got 1\)"),
        (dict(advantage_estimator="rloo", num_generations=3, batch_size=8, mini_batch_size=8),
         r"divisible by num_generations \(3\)"),
        (dict(gamma=1.5), r"gamma \(1.5\) must be in \[0, 1\]"),
        (dict(cliprange=0.0), r"cliprange \(0.0\) must be a finite number > 0"),
        (dict(mini_batch_size=0), r"mini_batch_size \(0\) must be a positive integer"),
        (dict(tis_cap=0.5), r"tis_cap \(0.5\) must be >= 1"),
        (dict(off_policy_correction="is"), r"off_policy_correction \('is'\)"),
        (dict(lr_scheduler_type="linear"), r"needs total_steps"),
        (dict(target_kl=-1.0), r"target_kl \(-1.0\)"),
        (dict(vf_coef=float("nan")), r"vf_coef \(nan\)"),
    ],
)
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_group_estimator_config():
    cfg = PPOConfig(advantage_estimator="grpo", num_generations=4, batch_size=8, mini_batch_size=4)
    assert not cfg.uses_critic
    assert PPOConfig().uses_critic
