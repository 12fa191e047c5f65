"""The long-tailed benchmark's workload and variants: budgets as specified, every variant a valid run config."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # bench_streaming imports its helpers as the script does

from benchmarks.bench_streaming import DEFAULT_PIPELINES, budgets, config, pipeline  # noqa: E402
from benchmarks.e2e.workload import Workload  # noqa: E402


def test_budgets_are_long_tailed_bounded_and_fixed_by_the_seed():
    got = budgets(2000, median=32, sigma=1.2, max_length=512, seed=0)
    assert got == budgets(2000, median=32, sigma=1.2, max_length=512, seed=0)
    assert 28 <= statistics.median(got) <= 36 and min(got) >= 1 and max(got) == 512
    assert statistics.mean(got) > 1.5 * statistics.median(got)  # the tail pulls the mean up


@pytest.mark.parametrize("name", [*DEFAULT_PIPELINES, "async-s2", "keep-s8-stream"])
def test_every_variant_is_a_valid_run_config(tmp_path, name):
    from rlhf_engine.engine.config import load_run_config

    p = pipeline(name, 16)
    wl = Workload(model=str(tmp_path), prompts=str(tmp_path / "p.jsonl"), batch_size=16, num_generations=4,
                  response_length=512, steps=3)
    cfg = load_run_config(None, base=config(wl, p, tmp_path / "run", [0, 1]))
    assert cfg.data.max_new_tokens_field == "budget" and cfg.generator.sampling.max_new_tokens == 512
    assert (cfg.generator.max_inflight, cfg.generator.inflight_update, cfg.engine.streaming) == (
        p.max_inflight, p.inflight_update, p.streaming)
    assert cfg.engine.mode == p.base.mode


@pytest.mark.parametrize("name", ["async-s1-stream", "keep", "keep-x1", "fast-s1", "keep-s1-fast", "keep-s1-stream"])
def test_unknown_variant_names_are_refused(name):
    with pytest.raises(ValueError, match="expected sync"):
        pipeline(name, 16)
