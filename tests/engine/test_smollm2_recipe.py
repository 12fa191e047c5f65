"""examples/smollm2_arithmetic on the real model: its data, a short SFT whose held-out loss falls, and (slow) a
short GRPO run whose held-out strict accuracy rises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf_engine.engine.config import load_run_config
from rlhf_engine.engine.core import RLHFEngine
from rlhf_engine.telemetry.files import read_jsonl

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "smollm2_arithmetic"


def _module(name: str):
    """The recipe's module `name`, under a name of its own (examples/verifiable_math has a `make_data` too)."""
    spec = importlib.util.spec_from_file_location(f"smollm2_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPE))  # the engine imports `arith_reward:reward` as the config names it
    return _module("make_data"), _module("arith_reward")


@pytest.fixture
def data(recipe, tmp_path):
    make_data, _ = recipe
    return make_data.write(tmp_path / "data")


def test_data_holds_out_pairs_and_rewards_read_the_answer(recipe, data):
    make_data, arith_reward = recipe
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in data.items()}
    train = {r["prompt"][0]["content"] for r in rows["train"]}
    held_out = {r["prompt"][0]["content"] for r in rows["eval"]}
    assert (len(train), len(held_out)) == (56, 24) and not train & held_out
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows["pairs"])
    answers = [r["answer"] for r in rows["eval"][:2]]
    right = [f"{a} = {a}\n#### {a}" for a in answers]
    assert arith_reward.reward(["p", "p"], right, answer=answers) == [1.2, 1.2]
    assert arith_reward.reward(["p", "p"], ["#### 99", answers[1]], answer=answers) == [0.2, 0.0]
    assert arith_reward.accuracy(["p"], [f"#### {answers[0]}"], answer=answers[:1]) == [1.0]


@pytest.mark.real_model
def test_short_sft_on_the_real_model_lowers_the_held_out_loss(data, real_model_dir, tmp_path):
    from rlhf_engine.trainer.stages.sft import SFTTrainer
    from rlhf_engine.trainer.stages.sft_config import SFTConfig

    config = SFTConfig(model_name_or_path=str(real_model_dir), train_file=str(data["sft"]), eval_split=0.2,
                       output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2,
                       learning_rate=2e-5, lr_scheduler_type="constant", eval_steps=2, max_length=128, seed=0)
    SFTTrainer(config).train()
    evals = [r["eval/loss"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "eval/loss" in r]
    # a trainer that does not update keeps the first value
    assert len(evals) == 2 and evals[0] > 0.3 and evals[-1] < 0.5 * evals[0]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.vllm
def test_short_grpo_on_the_real_model_raises_held_out_strict_accuracy(data, real_model_dir, tmp_path,
                                                                      assert_no_new_children):
    cfg = load_run_config(RECIPE / "grpo.yaml", [
        f"model.policy={real_model_dir}", f"data.prompts={data['train']}", f"data.eval_prompts={data['eval']}",
        f"transport.endpoint=ipc://{tmp_path}/ep", f"engine.run_dir={tmp_path / 'run'}", "engine.progress=false",
        "engine.total_steps=6", "engine.save_steps=0"])
    with RLHFEngine(cfg) as engine:
        engine.train()
    assert_no_new_children()
    accuracy = [r["eval/gold_mean"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/gold_mean" in r]
    # measured 0.08 -> 0.58 on the 24 held-out sums (greedy, right sum in the `#### N` format)
    assert len(accuracy) == 2 and accuracy[0] <= 0.2 and accuracy[-1] >= accuracy[0] + 0.25
