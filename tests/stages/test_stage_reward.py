"""Reward model on a separable synthetic preference set: high accuracy, a loadable scorer folder."""

import pytest
import torch

from rlhf_engine.data import preference_batch, synthetic
from rlhf_engine.trainer.stages.reward import RewardTrainer, with_pad_token
from rlhf_engine.trainer.stages.reward_config import RewardConfig


@pytest.fixture(scope="module")
def rm_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "out"
    config = RewardConfig(model_name_or_path=str(tiny_dir), output_dir=str(out), learning_rate=1e-3,
                          per_device_train_batch_size=16, max_steps=40, warmup_steps=4, logging_steps=10,
                          eval_split=0.2, max_length=64, center_rewards_coefficient=0.01)
    records = [{k: v for k, v in r.items() if k != "margin"} for r in synthetic.preference_records(400, min_gap=2)]
    trainer = RewardTrainer(config, train_dataset=records)
    before = trainer.evaluate()
    return trainer, before, trainer.train()


def test_reward_model_separates_the_pairs(rm_run):
    _, before, metrics = rm_run
    assert before["eval/accuracy"] < 0.8
    assert metrics["eval/accuracy"] >= 0.9
    assert metrics["eval/margin"] > 1.0 > before["eval/margin"]


def test_saved_reward_model_scores_like_the_trained_one(rm_run):
    from transformers import AutoModelForSequenceClassification

    trainer, _, _ = rm_run
    loaded = AutoModelForSequenceClassification.from_pretrained(trainer.config.output_dir).eval()
    assert loaded.config.num_labels == 1
    assert loaded.config.pad_token_id == trainer.tokenizer.pad_token_id
    batch = preference_batch(trainer.eval_data[:4], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        trainer.model.eval()
        chosen, rejected = trainer.rewards(batch)
    torch.testing.assert_close(got, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-5)


def test_pad_token_is_set_for_last_token_pooling(tiny_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, pad_token_id=None)
    assert model.config.pad_token_id is None
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert with_pad_token(model, tok).config.pad_token_id == tok.pad_token_id
    two = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    with pytest.raises(ValueError, match="num_labels == 1, got 2"):
        with_pad_token(two, tok)
