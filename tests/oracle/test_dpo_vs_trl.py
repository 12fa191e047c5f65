"""Our DPO against TRL's `DPOTrainer` (1.16) on the real model, as an independent oracle.

Policy: SmolLM2-135M-Instruct after a short SFT (`conftest.sft_policy_dir`); reference: the base model. So the
log-ratios are far from zero from the start (a comparison with policy = reference would prove nothing: every
sigmoid DPO loss is ln 2 there, every reward 0; the test asserts the values are far from those).

Both trainers get the same two chat preference pairs (rendered with the model's ChatML template; the token ids
are checked equal), all in one batch, and run the same three optimizer steps: AdamW (torch's fused, lr 5e-6,
betas (0.9, 0.999), eps 1e-8, no weight decay), linear decay without warmup, gradient norm clipped to 1.0,
beta 0.1, fp32 on the CPU. Compared within 1e-4: loss, rewards/chosen, rewards/rejected, rewards/margins and the
policy's summed log-probs (logps/chosen, logps/rejected) on the pairs before training (`evaluate`), at each of the
three steps (the training logs: forward at the weights before that step, plus the gradient norm), and after the
third step (`evaluate`). TRL options matched: loss_type ["sigmoid"], beta,
precompute_ref_log_probs False (our cached reference log-probs are the same numbers), max_length None,
optim adamw_torch_fused, lr_scheduler_type linear, warmup_steps 0, max_grad_norm 1.0, bf16 False,
gradient_checkpointing False.
"""

from __future__ import annotations

import math

import pytest

from tests.oracle.real_models import SYSTEM, load_pair

trl = pytest.importorskip("trl")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]  # minutes on two CPU cores: `make test-slow`

BETA = 0.1
LEARNING_RATE = 5e-6
STEPS = 3
TOL = 1e-4
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")

PAIRS = [
    {"prompt": [SYSTEM, {"role": "user", "content": "Compute 4 + 7."}],
     "chosen": [{"role": "assistant", "content": "4 + 7 = 11\n#### 11"}],
     "rejected": [{"role": "assistant", "content": "The sum of 4 and 7 is 12."}]},
    {"prompt": [SYSTEM, {"role": "user", "content": "Compute 30 + 12."}],
     "chosen": [{"role": "assistant", "content": "30 + 12 = 42\n#### 42"}],
     "rejected": [{"role": "assistant", "content": "30 + 12 = 42"}]},
]


def _ours(tmp_path, sft_policy_dir, real_model_dir, loss_type):
    from rlhf_engine.trainer.stages.dpo import DPOTrainer
    from rlhf_engine.trainer.stages.dpo_config import DPOConfig

    tokenizer, policy, ref = load_pair(sft_policy_dir, real_model_dir)
    config = DPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=len(PAIRS),
                       per_device_eval_batch_size=len(PAIRS), max_steps=STEPS, learning_rate=LEARNING_RATE,
                       beta=BETA, loss_type=loss_type, lr_scheduler_type="linear", warmup_steps=0,
                       max_grad_norm=1.0, logging_steps=1, max_length=None, device="cpu", seed=0)
    return DPOTrainer(config, model=policy, ref_model=ref, tokenizer=tokenizer, train_dataset=PAIRS,
                      eval_dataset=PAIRS)


def _trl(tmp_path, sft_policy_dir, real_model_dir, loss_type):
    from datasets import Dataset

    tokenizer, policy, ref = load_pair(sft_policy_dir, real_model_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS),
                         per_device_eval_batch_size=len(PAIRS), max_steps=STEPS, learning_rate=LEARNING_RATE,
                         beta=BETA, loss_type=[loss_type], lr_scheduler_type="linear", warmup_steps=0,
                         max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch_fused", logging_steps=1,
                         max_length=None, bf16=False, use_cpu=True, gradient_checkpointing=False,
                         report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    return trl.DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))


def _close(ours: dict[str, float], theirs: dict[str, float], where: str) -> None:
    diffs = {k: abs(ours[k] - theirs[k]) for k in ours}
    print(f"{where}: max |ours - TRL| {max(diffs.values()):.2e}; ours {ours}")
    assert max(diffs.values()) < TOL, f"{where}: ours {ours}, TRL {theirs}, |diff| {diffs}"


def _check_same_tokens(ours, theirs) -> None:
    for pair, row in zip(ours.train_data, theirs.train_dataset):
        assert pair.chosen_ids == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected_ids == row["prompt_ids"] + row["rejected_ids"]
        assert sum(t != -100 for t in pair.chosen_labels) == len(row["chosen_ids"])
        assert sum(t != -100 for t in pair.rejected_labels) == len(row["rejected_ids"])


def test_dpo_before_and_after_three_steps_equals_trl(tmp_path, sft_policy_dir, real_model_dir):
    ours, theirs = (_ours(tmp_path, sft_policy_dir, real_model_dir, "sigmoid"),
                    _trl(tmp_path, sft_policy_dir, real_model_dir, "sigmoid"))
    _check_same_tokens(ours, theirs)

    # before training: far from the trivial point (loss ln 2, rewards 0) of policy = reference
    ours_before = {k: ours.evaluate()[f"eval/{k}"] for k in METRICS}
    trl_eval = theirs.evaluate()
    trl_before = {k: trl_eval[f"eval_{k}"] for k in METRICS}
    _close(ours_before, trl_before, "before training")
    assert abs(ours_before["loss"] - math.log(2)) > 0.1, ours_before
    assert abs(ours_before["rewards/chosen"]) > 0.2 and abs(ours_before["rewards/margins"]) > 0.2, ours_before

    # three optimizer steps: the logged forward of each step (weights before it) and its gradient norm
    ours.train()
    theirs.train()
    ours_steps = [r for r in ours.log_history if "train/loss" in r]
    trl_steps = [r for r in theirs.state.log_history if "loss" in r and "train_runtime" not in r]
    assert [r["step"] for r in ours_steps] == [r["step"] for r in trl_steps] == [1, 2, 3]
    for o, t in zip(ours_steps, trl_steps):
        _close({k: o[f"train/{k}"] for k in (*METRICS, "grad_norm")},
               {k: t[k] for k in (*METRICS, "grad_norm")}, f"step {o['step']}")
    assert all(r["train/grad_norm"] > 1.0 for r in ours_steps), "clipping at 1.0 is engaged on every step"

    # after the three steps: the same numbers again, and training moved them
    ours_after = {k: ours.evaluate()[f"eval/{k}"] for k in METRICS}
    trl_eval = theirs.evaluate()
    trl_after = {k: trl_eval[f"eval_{k}"] for k in METRICS}
    _close(ours_after, trl_after, "after three steps")
    assert ours_before["loss"] - ours_after["loss"] > 0.05, (ours_before, ours_after)
    assert abs(ours_after["loss"] - math.log(2)) > 0.1, ours_after
