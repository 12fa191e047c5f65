"""Metrics JSONL, timeline and idle fractions."""

import math

from rlhf_engine.telemetry.files import read_jsonl
from rlhf_engine.telemetry.metrics import MetricsLogger
from rlhf_engine.telemetry.timeline import Interval, Timeline, idle_fractions


def test_metrics_jsonl_records_steps(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=2, progress=False)
    log.log(1, {"env/reward_mean": 0.5, "objective/kl": float("nan")})
    log.log(2, {"env/reward_mean": 1.0})
    log.close()
    log.close()  # idempotent
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["env/reward_mean"] == 0.5 and rows[0]["objective/kl"] == "nan"


def test_idle_fractions_merge_overlaps():
    # trainer busy [0,4] and [3,6] -> merged [0,6] of [0,10] -> idle 0.4
    # generator busy [2,3] -> idle 0.9
    ivs = [Interval("trainer", "update", 0, 4), Interval("trainer", "score", 3, 6), {"proc": "gen", "phase": "g", "start": 2, "end": 3}]
    out = idle_fractions(ivs, 0, 10)
    assert math.isclose(out["trainer"], 0.4) and math.isclose(out["gen"], 0.9)


def test_timeline_appends(tmp_path):
    t = Timeline(tmp_path)
    t.add("trainer", "update", 1.0, 2.0)
    t.close()
    assert read_jsonl(tmp_path / "timeline.jsonl") == [{"proc": "trainer", "phase": "update", "start": 1.0, "end": 2.0}]
