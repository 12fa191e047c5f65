"""SFT on the synthetic task: the loss falls, accumulation is exact, the output is an HF folder."""

import json

import pytest
import torch

from rlhf_engine.data import synthetic
from rlhf_engine.trainer.stages.sft import SFTTrainer
from rlhf_engine.trainer.stages.sft_config import SFTConfig


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "out"
    config = SFTConfig(model_name_or_path=str(tiny_dir), output_dir=str(out), learning_rate=3e-3,
                       per_device_train_batch_size=16, max_steps=30, warmup_steps=3, logging_steps=5,
                       eval_split=0.1, eval_steps=10, save_steps=20, max_length=64)
    trainer = SFTTrainer(config, train_dataset=synthetic.sft_records(400))
    before = trainer.evaluate()["eval/loss"]
    return trainer, before, trainer.train()


def test_sft_loss_falls(sft_run):
    _, before, metrics = sft_run
    assert before > 5.0  # ~ln(512) for a random model
    assert metrics["eval/loss"] < 2.5
    assert metrics["train/loss"] < metrics["train/first_loss"]
    assert (metrics["data/train/read"], metrics["data/train/truncated"]) == (400, 0)


def test_sft_output_is_a_loadable_hf_folder_with_metrics(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, before, metrics = sft_run
    out = trainer.config.output_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the cat likes a red apple"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trainer.model.eval()(**batch).logits)
    # checkpoint-20 holds trained weights: it fits the task's text better than the starting model
    held_out = [r["prompt"] + r["completion"] for r in synthetic.sft_records(8, seed=5)]
    text = tok(held_out, return_tensors="pt", padding=True)
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)

    def loss(path):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path)(**text, labels=labels).loss.item()

    # measured 5.47 against 6.25 (ln 512 = 6.24; the prompt tokens, never trained, count too)
    assert loss(f"{out}/checkpoint-20") < loss(trainer.config.model_name_or_path) - 0.5
    lines = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in lines if "train/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["eval/loss"] == metrics["eval/loss"]
    # evaluated at the start (step 0: the untrained model's loss), every eval_steps and at the end
    evals = [r for r in lines if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[0]["eval/loss"] == pytest.approx(before, abs=1e-5) and evals[-1]["eval/loss"] < before - 2.5


def test_gradient_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    config = SFTConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path), max_length=64)
    trainer = SFTTrainer(config, train_dataset=synthetic.sft_records(8, seed=1))
    examples = trainer.train_data

    def grads(batch_size):
        trainer.model.zero_grad()
        metrics = trainer._step(trainer._batches(examples, batch_size, None))
        return metrics, [p.grad.clone() for p in trainer.model.parameters()]

    m1, g1 = grads(8)  # one micro-batch of 8
    m2, g2 = grads(3)  # micro-batches of 3, 3 and 2 with different padding
    assert m1["tokens"] == m2["tokens"]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_eval_loss_equals_padded_from_jsonl_files(tiny_dir, tmp_path):
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_records(4, seed=2)))
    evals.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_records(24, seed=3)))
    losses = {}
    for packing in (False, True):
        config = SFTConfig(model_name_or_path=str(tiny_dir), train_file=str(train), eval_file=str(evals),
                           output_dir=str(tmp_path / "out"), max_length=64, packing=packing,
                           per_device_eval_batch_size=4)
        trainer = SFTTrainer(config)
        assert [s.summary().split(":")[0] for s in trainer.data_stats] == ["train", "eval"]
        losses[packing] = trainer.evaluate()
    assert losses[True]["eval/tokens"] == losses[False]["eval/tokens"]
    assert losses[True]["eval/loss"] == pytest.approx(losses[False]["eval/loss"], rel=1e-5)


def test_loss_and_gradients_from_hidden_equal_the_logits_path(tiny_dir, tmp_path):
    # logprobs_from_hidden: the loss without [tokens, V] logits; same loss and gradients as cross-entropy
    results = []
    for from_hidden in (False, True):
        config = SFTConfig(model_name_or_path=str(tiny_dir), output_dir=str(tmp_path), max_length=64,
                           logprobs_from_hidden=from_hidden)
        trainer = SFTTrainer(config, train_dataset=synthetic.sft_records(8, seed=1))
        trainer.model.zero_grad()
        metrics = trainer._step(trainer._batches(trainer.train_data, 3, None))
        results.append((metrics, [p.grad.clone() for p in trainer.model.parameters()]))
    (m0, g0), (m1, g1) = results
    assert m1["tokens"] == m0["tokens"] and m1["loss"] == pytest.approx(m0["loss"], rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
