"""Held-out evaluation in the engine (real generator processes, transformers backend): when it runs, what it
logs, that it samples the current policy version, and that it changes nothing of the training."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from _runs import run_config

from rlhf_engine.common.config_io import to_dict
from rlhf_engine.data import synthetic
from rlhf_engine.engine.config import load_run_config
from rlhf_engine.engine.core import RLHFEngine
from rlhf_engine.telemetry.files import read_jsonl
from rlhf_engine.telemetry.plots import plot_run

EVAL_KEYS = {"eval/reward_mean", "eval/gold_mean", "eval/pass@2", "eval/response_length_mean", "eval/policy_version",
             "eval/samples", "eval/nonfinite_rewards", "eval/dropped_rollouts", "time/engine/eval"}


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """10 held-out prompts: two evaluation batches of the runs' 8 prompts per step (8 + 2)."""
    path = tmp_path_factory.mktemp("eval_data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(10, seed=1)))
    return path


def config(tmp_path, policy_dir, prompts_file, eval_file=None, *, evaluation: dict | None = None, **engine):
    base = to_dict(run_config(tmp_path, policy_dir, prompts_file, backend="transformers", **engine))
    if evaluation is not None:
        base["data"]["eval_prompts"] = str(eval_file)
        base["engine"].update(evaluation)
    return load_run_config(None, base=base)


def trained_state(engine: RLHFEngine) -> dict:
    return {"model": {k: v.clone() for k, v in engine.trainer.model.state_dict().items()},
            "prompts": engine._handout.state_dict(), "kl": engine.trainer.state_dict()["kl_ctl"],
            "torch_rng": torch.get_rng_state()}


def test_eval_at_step_0_every_n_and_the_end_leaves_training_unchanged(tmp_path, policy_dir, prompts_file, eval_file,
                                                                      assert_no_new_children):
    runs = {}
    for name, evaluation in (("on", {"eval_steps": 2, "eval_samples": 2, "eval_temperature": 1.0}), ("off", None)):
        cfg = config(tmp_path / name, policy_dir, prompts_file, eval_file, evaluation=evaluation, total_steps=3,
                     mode="sync")
        torch.manual_seed(0)  # the same process RNG at the start of both runs: the eval must consume none of it
        with RLHFEngine(cfg) as engine:
            history = engine.train()
            runs[name] = (history, trained_state(engine))
    assert_no_new_children()

    # evaluated at step 0 (a record of its own), step 2 (every 2) and step 3 (the end), never at step 1
    rows = read_jsonl(tmp_path / "on" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [EVAL_KEYS <= set(r) for r in rows] == [True, False, True, True]
    assert not any(k.startswith("eval/") for r in read_jsonl(tmp_path / "off" / "run" / "metrics.jsonl") for k in r)
    for r, version in zip((rows[0], rows[2], rows[3]), (0, 2, 3)):
        assert r["eval/policy_version"] == version  # the weights of that step, sampled by the generator
        assert r["eval/samples"] == 10 * 2 and r["eval/dropped_rollouts"] == 0
        assert 1 <= r["eval/response_length_mean"] <= 8 and 0 <= r["eval/pass@2"] <= 1
        # the demo's gold function is the reward function here: same mean
        assert r["eval/reward_mean"] == pytest.approx(r["eval/gold_mean"])
    history_on, on = runs["on"]
    history_off, off = runs["off"]
    assert [h["step"] for h in history_on] == [1, 2, 3]  # the step-0 evaluation is logged, not a step

    # the same training, sample for sample: rewards, weights, data position, KL controller, process RNG
    assert [h["env/reward_mean"] for h in history_on] == [h["env/reward_mean"] for h in history_off]
    assert on["model"].keys() == off["model"].keys()
    for k in on["model"]:
        assert torch.equal(on["model"][k], off["model"][k]), k
    assert on["prompts"] == off["prompts"] and on["kl"] == off["kl"]
    assert torch.equal(on["torch_rng"], off["torch_rng"])

    # the eval curves in `rlhf-engine plot`
    written = {p.name for p in plot_run(tmp_path / "on" / "run")}
    assert {"eval.png", "eval_length.png"} <= written


def test_async_greedy_eval_samples_the_newest_version(tmp_path, policy_dir, prompts_file, eval_file,
                                                      assert_no_new_children):
    cfg = config(tmp_path, policy_dir, prompts_file, eval_file, evaluation={"eval_steps": 1}, total_steps=2,
                 mode="async", max_staleness=1)
    assert (cfg.engine.eval_samples, cfg.engine.eval_temperature) == (1, 0.0)  # greedy by default
    with RLHFEngine(cfg) as engine:
        engine.train()
    assert_no_new_children()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # batch 1 was sampled ahead by version 0, yet the evaluation after step 1 waits for version 1
    assert [(r["step"], r["eval/policy_version"], r["eval/samples"]) for r in rows] == [(0, 0, 10), (1, 1, 10), (2, 2, 10)]
    assert all("eval/pass@1" in r for r in rows)


def test_cli_bad_eval_config_is_one_line(tmp_path, policy_dir, prompts_file, capsys):
    from rlhf_engine.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{policy: {policy_dir}, reward_fn: 'rlhf_engine.demo:gold_scores'}}\n"
                    f"data: {{prompts: {prompts_file}}}\n")
    eval_prompts = ["--set", f"data.eval_prompts={prompts_file}"]
    cases = {
        "steps without prompts": (["--set", "engine.eval_steps=2"],
                                  "data.eval_prompts (None) and engine.eval_steps (2) go together"),
        "prompts without steps": (eval_prompts, f"data.eval_prompts ('{prompts_file}') and engine.eval_steps (0)"),
        "greedy k": ([*eval_prompts, "--set", "engine.eval_steps=1", "--set", "engine.eval_samples=4"],
                     "engine.eval_samples (4) > 1 at engine.eval_temperature 0 gives 4 identical greedy completions"),
        "negative": (["--set", "engine.eval_temperature=-1"], "engine.eval_temperature (-1.0) must be finite and >= 0"),
        "missing file": (["--set", f"data.eval_prompts={tmp_path / 'none.jsonl'}", "--set", "engine.eval_steps=1"],
                         f"config error: data.eval_prompts: no such file or folder: {tmp_path / 'none.jsonl'}"),
    }
    sigterm = signal.getsignal(signal.SIGTERM)  # main() turns SIGTERM into KeyboardInterrupt
    try:
        for name, (extra, expected) in cases.items():
            code = main(["ppo", "--config", str(path), "--set", f"engine.run_dir={tmp_path / 'run'}", *extra])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("rlhf-engine ppo:")]
            assert code == 2 and len(lines) == 1 and expected in lines[0], (name, err[-2000:])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
