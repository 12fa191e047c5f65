"""A resumed run logs the steps after its checkpoint again: their old records go first."""

from rlhf_engine.telemetry.files import drop_steps_after, read_jsonl
from rlhf_engine.telemetry.metrics import MetricsLogger


def test_drop_steps_after_keeps_each_step_once(tmp_path):
    log = MetricsLogger(tmp_path, progress=False)
    for step in (1, 2, 3, 4):
        log.log(step, {"x": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x"')  # torn by a crash mid-write
    drop_steps_after(tmp_path, 2)  # resumed from the checkpoint of step 2
    log = MetricsLogger(tmp_path, progress=False, initial_step=2)
    log.log(3, {"x": 30.0})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_drop_steps_after_without_a_file(tmp_path):
    drop_steps_after(tmp_path, 3)
    assert not (tmp_path / "metrics.jsonl").exists()
