"""DPO: cached reference log-probs, the chosen-vs-rejected margin rises (sigmoid and IPO)."""

import pytest
import torch

from rlhf_engine.data import synthetic
from rlhf_engine.trainer.stages.dpo import DPOTrainer
from rlhf_engine.trainer.stages.dpo_config import DPOConfig


@pytest.mark.parametrize("loss_type, lr", [("sigmoid", 1e-3), ("ipo", 1e-3)])
def test_dpo_raises_the_margin(tiny_dir, tmp_path, loss_type, lr):
    config = DPOConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path), learning_rate=lr,
                       per_device_train_batch_size=16, max_steps=12, logging_steps=4, eval_split=0.25,
                       max_length=64, loss_type=loss_type, beta=0.1)
    trainer = DPOTrainer(config, train_dataset=synthetic.preference_records(128, min_gap=2))
    # the reference is the initial policy: before training every implicit reward is exactly 0
    before = trainer.evaluate()
    assert before["eval/rewards/margins"] == 0.0 and before["eval/rewards/chosen"] == 0.0
    assert trainer.ref_train.shape == (96, 2) and trainer.ref_eval.shape == (32, 2)
    assert [n for n, v in vars(trainer).items() if isinstance(v, torch.nn.Module)] == ["model"]  # ref released
    metrics = trainer.train()
    assert metrics["eval/rewards/margins"] > 0.05
    assert metrics["eval/rewards/accuracies"] >= 0.75
    assert metrics["train/loss"] < metrics["train/first_loss"]
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies"} <= set(metrics)


def test_reference_logps_from_hidden_equal_the_logits_path(tiny_dir, tmp_path):
    refs = []
    for from_hidden in (False, True):
        config = DPOConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path), max_length=64,
                           eval_split=0.25, logprobs_from_hidden=from_hidden)
        trainer = DPOTrainer(config, train_dataset=synthetic.preference_records(16, min_gap=2))
        refs.append(trainer.ref_train)
    assert refs[0].shape == (12, 2) and refs[0].abs().min() > 1.0  # summed log-probs of real completions
    torch.testing.assert_close(refs[1], refs[0], rtol=1e-5, atol=1e-4)
