"""The end-to-end benchmark's machinery: variant names, CPU plans, the steady-state numbers on a
hand-made run, and (slow) one tiny variant through the real script with the transformers backend."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks.e2e import analysis
from benchmarks.e2e.trl_grpo import trl_reward
from benchmarks.e2e.workload import Variant, Workload, arithmetic_task, cpu_plan, parse_variant, run_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["pinned/sync", "pinned/async-s1", "unpinned/async-s2-g2", "unpinned/sync-grpo"])
def test_variant_names_round_trip(name):
    assert parse_variant(name).name == name


@pytest.mark.parametrize("name, match", [("pinned", "SETTING/MODE"), ("pinned/async-s0", "max_staleness"),
                                         ("fast/sync", "SETTING/MODE"), ("pinned/sync-x3", "unknown part"),
                                         ("pinned/async-s1-g1", "canonical")])
def test_bad_variant_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(name)


def test_cpu_plan_pins_generator_and_trainer_to_their_own_cores():
    assert cpu_plan(parse_variant("pinned/async-s1"), [0, 1]) == {
        "trainer_threads": 1, "trainer_cpus": [1], "generator_threads": 1, "generator_cpus": [[0]]}
    assert cpu_plan(parse_variant("unpinned/sync"), [0, 1]) == {
        "trainer_threads": 2, "trainer_cpus": [0, 1], "generator_threads": 2, "generator_cpus": [[0, 1]]}
    with pytest.raises(ValueError, match="need 3 cores; this machine has 2"):
        cpu_plan(parse_variant("pinned/sync-g2"), [0, 1])
    assert not parse_variant("pinned/sync-g2").fits(2) and parse_variant("unpinned/sync-g2").fits(2)


def test_run_config_is_a_valid_engine_config(tmp_path):
    from rlhf_engine.engine.config import load_run_config

    wl = Workload(model=str(tmp_path), prompts=str(tmp_path / "p.jsonl"), batch_size=8, num_generations=4,
                  response_length=16, steps=3)
    cfg = load_run_config(None, base=run_config(wl, Variant(mode="async", max_staleness=2), tmp_path / "run", [0, 1]))
    assert (cfg.engine.batches_in_flight, cfg.engine.trainer_cpus, cfg.engine.generator_cpus) == (3, [1], [[0]])
    assert cfg.engine.total_steps == 5  # 3 run + 2 handed out ahead (staleness 2): no final checkpoint
    sampling = cfg.generator.sampling
    assert (cfg.prompts_per_step, sampling.max_new_tokens, sampling.ignore_eos) == (2, 16, True)


def test_arithmetic_task_is_the_recipes_with_eos_and_its_held_out_prompts(tmp_path, monkeypatch):
    from rlhf_engine.engine.config import load_run_config

    fields = arithmetic_task(tmp_path / "data")
    monkeypatch.syspath_prepend(fields["python_path"])  # the reward module, as the children's PYTHONPATH has it
    wl = Workload(model=str(tmp_path), **fields, batch_size=32, num_generations=8, steps=2, kl_coef=0.0)
    cfg = load_run_config(None, base=run_config(wl, Variant(estimator="grpo"), tmp_path / "run", [0, 1]))
    sampling = cfg.generator.sampling
    assert (sampling.ignore_eos, sampling.temperature, cfg.ppo.temperature) == (False, 0.7, 0.7)
    assert (cfg.model.reward_fn, cfg.model.gold_fn) == ("arith_reward:reward", "arith_reward:accuracy")
    train = [json.loads(line) for line in Path(wl.prompts).read_text().splitlines()]
    held_out = [json.loads(line) for line in Path(wl.eval_prompts).read_text().splitlines()]
    assert (len(train), len(held_out)) == (56, 24)
    assert not {r["answer"] for r in held_out} - {str(n) for n in range(2, 19)}
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in held_out}


def test_trl_reward_scores_chat_completions_with_the_records_fields(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent / "examples" / "smollm2_arithmetic"))
    reward = trl_reward("arith_reward:reward", frozenset({"answer"}))
    prompts = [[{"role": "user", "content": "What is 4 + 7?"}]] * 3
    completions = [[{"role": "assistant", "content": text}] for text in ("4 + 7 = 11\n#### 11", "#### 12", "11")]
    # TRL passes every dataset column and its own extras (completion_ids, trainer_state) as keyword arguments
    scores = reward(prompts, completions, answer=["11"] * 3, completion_ids=[[1]] * 3, trainer_state=None)
    assert scores == pytest.approx([1.2, 0.2, 0.0])  # right + format, format only, neither
    assert reward.__name__ == "reward"


def _row(step: int, time: float, wait: float) -> dict:
    # a step of 2 s: 0.5 forward, 1.0 update, 0.1 weight sync, the rest waiting or bookkeeping
    return {"step": step, "time": time, "time/engine/step": 2.0, "time/engine/wait_rollouts": wait,
            "time/engine/weight_sync": 0.1, "time/ppo/forward_pass": 0.5, "time/ppo/compute_rewards": 0.01,
            "time/ppo/compute_advantages": 0.02, "time/ppo/optimize_step": 1.0, "time/ppo/total": 1.6,
            "env/generated_tokens": 64.0, "env/reward_mean": float(step), "env/reward_std": 1.2,
            "objective/kl": 0.1 * step}


def test_summary_of_a_hand_made_run():
    result = {
        "mode": "async",
        "t_start": 6.0,
        "rows": [_row(1, 10.0, 1.5), _row(2, 12.0, 0.5), _row(3, 14.0, 0.5)],
        "timeline": [
            {"proc": "generator-0", "phase": "generate", "start": 8.0, "end": 9.5},  # warm-up batch: left out
            {"proc": "generator-0", "phase": "generate", "start": 10.0, "end": 11.0},
            {"proc": "generator-0", "phase": "generate", "start": 12.0, "end": 13.0},
            {"proc": "trainer", "phase": "ppo_step", "start": 10.5, "end": 12.0},
            {"proc": "trainer", "phase": "ppo_step", "start": 12.5, "end": 14.0},
        ],
        "loop_stats": {"generator-0": {"generate_s": 3.5, "update_s": 0.5, "batches": 3}},
    }
    s = analysis.summarize(result, warmup=1, batch_size=8)
    # steady window: end of step 1 (t=10) .. end of step 3 (t=14): 2 steps of 8 samples in 4 s
    assert (s["steady_steps"], s["s_per_step"], s["samples_per_s"], s["tokens_per_s"]) == (2, 2.0, 4.0, 32.0)
    assert s["idle_trainer"] == pytest.approx(0.25)  # busy 1.5 + 1.5 of 4 s
    assert s["idle_generator"] == pytest.approx(0.5)  # busy 1 + 1 of 4 s
    assert s["idle_generators_whole_run"]["generator-0"] == pytest.approx(0.5)  # 1 - (3.5 + 0.5) / (14 - 6)
    assert s["phases_s"]["generate"] == pytest.approx(1.0)
    assert s["phases_s"]["train"] == pytest.approx(1.5)  # step 2.0 - wait 0.5
    assert s["phases_s"]["score_other"] == pytest.approx(0.07)  # 1.6 - (0.5 + 0.01 + 0.02 + 1.0)
    assert (s["reward_last3"], s["kl_mean"]) == (pytest.approx(2.0), pytest.approx(0.25))
    assert s["reward_last3_se"] == pytest.approx(1.2 / math.sqrt(24))  # std 1.2 over 3 steps x 8 samples


def test_overlap_bound_and_achieved_speedup():
    # T_gen 1, T_train 2: alternating takes 3 s per step, perfect overlap 2 s -> bound 1.5
    assert analysis.overlap_bound(1.0, 2.0) == 1.5
    sync = {"phases_s": {"generate": 1.0, "train": 2.0}, "s_per_step": 3.0, "reward_last3": 0.5,
            "reward_last3_se": 0.3}
    fast = {"s_per_step": 2.0, "idle_trainer": 0.05, "idle_generator": 0.5, "reward_last3": 0.7,
            "reward_last3_se": 0.4}
    slow = {"s_per_step": 2.5, "idle_trainer": 0.2, "idle_generator": 0.6, "reward_last3": 0.5,
            "reward_last3_se": 0.4}
    out = analysis.compare_async(sync, {"a": fast, "b": slow})
    assert (out["a"]["achieved"], out["a"]["fraction_of_bound"], out["a"]["gain_captured"]) == (1.5, 1.0, 1.0)
    assert out["b"]["achieved"] == pytest.approx(1.2) and out["b"]["gain_captured"] == pytest.approx(0.4)
    assert (out["a"]["bottleneck"], out["a"]["bottleneck_idle"]) == ("trainer", 0.05)
    assert (out["a"]["reward_diff"], out["a"]["reward_diff_se"]) == (pytest.approx(0.2), pytest.approx(0.5))


@pytest.mark.slow
def test_one_tiny_variant_through_the_script(tmp_path):
    import runpy

    out_dir = tmp_path / "results"
    argv = ["bench_e2e.py", "--quick", "--backend", "transformers", "--variants", "pinned/sync", "--steps", "2",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(out_dir), "--tag", "smoke"]
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(BENCHMARKS / "bench_e2e.py"), run_name="__main__")
    finally:
        sys.argv = saved
    result = json.loads((out_dir / "e2e_smoke.json").read_text())
    summary = result["variants"]["pinned/sync"]["summary"]
    assert (summary["steps"], summary["steady_steps"]) == (2, 1)
    assert summary["samples_per_s"] > 0 and 0.0 <= summary["idle_trainer"] <= 1.0
    assert math.isfinite(summary["phases_s"]["generate"]) and summary["phases_s"]["generate"] > 0
    assert result["machine"]["cpus"] >= 1 and result["versions"]["torch"]
    assert (out_dir / "e2e_smoke_timeline.png").stat().st_size > 0
