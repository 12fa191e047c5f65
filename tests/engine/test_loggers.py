"""engine.loggers: the config field, the W&B sink offline (read back from its run file), a missing wandb."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from rlhf_engine.engine.config import EngineConfig, load_run_config, save_run_config
from rlhf_engine.telemetry.files import read_jsonl
from rlhf_engine.telemetry.metrics import MetricsLogger
from rlhf_engine.telemetry.sinks import WANDB_MISSING, MissingLoggerPackage
from rlhf_engine.telemetry.timeline import Timeline
from tests.helpers.waiting import wait_until


def test_loggers_default_and_validation():
    assert EngineConfig().loggers == ["jsonl", "tensorboard"]
    assert EngineConfig(loggers=["wandb"]).loggers == ["jsonl", "wandb"]  # jsonl is always on
    with pytest.raises(ValueError, match=r"engine.loggers \(\['jsonl', 'mlflow'\]\) must name each of"):
        EngineConfig(loggers=["jsonl", "mlflow"])
    with pytest.raises(ValueError, match="at most once"):
        EngineConfig(loggers=["wandb", "wandb"])


def test_loggers_round_trip_through_yaml(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    base = {"model": {"policy": str(tmp_path), "reward_fn": "m:f"}, "data": {"prompts": str(tmp_path / "p.jsonl")},
            "engine": {"loggers": ["wandb"]}}
    cfg = load_run_config(None, base=base)
    save_run_config(cfg, tmp_path / "run.yaml")
    assert load_run_config(tmp_path / "run.yaml").engine.loggers == ["jsonl", "wandb"]
    overridden = load_run_config(tmp_path / "run.yaml", ["engine.loggers=[tensorboard, wandb]"])
    assert overridden.engine.loggers == ["jsonl", "tensorboard", "wandb"]


@pytest.fixture
def no_wandb(monkeypatch):
    """`import wandb` fails as it does where the package is not installed."""
    monkeypatch.setitem(sys.modules, "wandb", None)


def test_missing_wandb_is_one_line_error_naming_the_extra(tmp_path, no_wandb):
    with pytest.raises(ImportError) as info:
        MetricsLogger(tmp_path, loggers=["jsonl", "wandb"], progress=False)
    assert str(info.value) == WANDB_MISSING
    assert "\n" not in WANDB_MISSING and "pip install 'rlhf_engine[wandb]'" in WANDB_MISSING
    assert isinstance(info.value, MissingLoggerPackage)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was opened


def test_cli_reports_missing_wandb_in_one_line_before_starting_generators(tmp_path):
    from rlhf_engine.models.tiny import make_tiny_model_dir

    policy = make_tiny_model_dir(tmp_path / "policy")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n' * 8)
    cfg = load_run_config(None, base={
        "model": {"policy": str(policy), "reward_fn": "rlhf_engine.demo:gold_scores"},
        "data": {"prompts": str(tmp_path / "p.jsonl")},
        "ppo": {"batch_size": 4, "mini_batch_size": 2, "response_length": 4},
        "generator": {"backend": "transformers"},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep"},
        "engine": {"run_dir": str(tmp_path / "run"), "loggers": ["jsonl", "wandb"], "progress": False},
    })
    save_run_config(cfg, tmp_path / "run.yaml")
    blocker = tmp_path / "blocked" / "wandb"  # an importable `wandb` that fails like a missing one
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env_path = f"{blocker.parent}:{':'.join(sys.path)}"
    res = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "ppo", "--config", str(tmp_path / "run.yaml")],
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"rlhf-engine ppo: config error: {WANDB_MISSING}"
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "generator-0.log").exists()  # no generator was started


def test_wandb_offline_run_holds_config_metrics_timeline_and_plots(tmp_path, monkeypatch, assert_no_new_children):
    wandb = pytest.importorskip("wandb")
    from tests.helpers.wandb_records import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_config = {"ppo": {"learning_rate": 0.001, "batch_size": 8}, "engine": {"loggers": ["jsonl", "wandb"]}}
    logger = MetricsLogger(tmp_path, loggers=["jsonl", "wandb"], progress=False, run_config=run_config)
    timeline = Timeline(tmp_path)
    timeline.add("trainer", "ppo_step", 100.0, 101.5)
    timeline.add("generator-0", "generate", 100.5, 102.0)
    timeline.close()
    logger.log(1, {"env/reward_mean": 0.25, "objective/kl": 0.0, "ppo/skipped": 0})
    logger.log(2, {"env/reward_mean": 0.75, "objective/kl": 0.125, "ppo/skipped": 0})
    logger.close()
    logger.close()  # idempotent
    assert wandb.run is None  # no run left alive
    assert_no_new_children()  # W&B's service process is gone

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, list((tmp_path / "wandb").iterdir())
    run = read_run(next(run_dirs[0].glob("run-*.wandb")))
    assert run["config"]["ppo"] == {"learning_rate": 0.001, "batch_size": 8}
    rows = {r["_step"]: r for r in run["history"]}
    # every numeric metric of metrics.jsonl is in the W&B history with its value
    for rec in read_jsonl(tmp_path / "metrics.jsonl"):
        for key in ("env/reward_mean", "objective/kl", "ppo/skipped"):
            assert rows[rec["step"]][key] == rec[key]
    assert rows[2]["env/reward_mean"] == 0.75 and rows[2]["objective/kl"] == 0.125
    # the end-of-run extras are in the last step's row: the timeline table and the plots as images
    # (W&B stores a logged media object as flattened keys: `timeline/_type`, `timeline/path`, ...)
    assert rows[2]["timeline/_type"] == "table-file" and rows[2]["timeline/nrows"] == 2
    table = json.loads((run_dirs[0] / "files" / rows[2]["timeline/path"]).read_text())
    assert table["columns"] == ["proc", "phase", "start_s", "end_s"]
    assert table["data"] == [["trainer", "ppo_step", 0.0, 1.5], ["generator-0", "generate", 0.5, 2.0]]
    for plot in ("reward", "kl", "timeline"):
        assert rows[2][f"plots/{plot}/_type"] == "image-file"
        assert (run_dirs[0] / "files" / rows[2][f"plots/{plot}/path"]).read_bytes()[:4] == b"\x89PNG"


def test_engine_run_sends_every_jsonl_metric_to_wandb(tmp_path, monkeypatch, assert_no_new_children):
    wandb = pytest.importorskip("wandb")
    from rlhf_engine.data import synthetic
    from rlhf_engine.engine.core import RLHFEngine
    from rlhf_engine.models.tiny import make_tiny_model_dir
    from tests.helpers.wandb_records import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    policy = make_tiny_model_dir(tmp_path / "policy")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in synthetic.prompts(16)))
    cfg = load_run_config(None, base={
        "model": {"policy": str(policy), "reward_fn": "rlhf_engine.demo:gold_scores"},
        "data": {"prompts": str(tmp_path / "p.jsonl"), "max_prompt_length": 16},
        "ppo": {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "response_length": 4},
        "generator": {"backend": "transformers"},
        "transport": {"endpoint": f"ipc://{tmp_path}/ep"},
        "engine": {"run_dir": str(tmp_path / "run"), "total_steps": 2, "mode": "sync",
                   "loggers": ["jsonl", "wandb"], "progress": False},
    })
    with RLHFEngine(cfg) as engine:
        engine.train()
    assert wandb.run is None
    assert_no_new_children()

    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    run = read_run(run_file)
    assert run["config"]["ppo"]["batch_size"] == 4 and run["config"]["engine"]["loggers"] == ["jsonl", "wandb"]
    rows = {r["_step"]: r for r in run["history"]}
    jsonl = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == [1, 2]
    for rec in jsonl:
        numeric = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        assert len(numeric) > 20
        assert {k: rows[rec["step"]][k] for k in numeric} == pytest.approx(numeric, nan_ok=True)
    assert rows[2]["timeline/_type"] == "table-file" and rows[2]["plots/timeline/_type"] == "image-file"


def test_wandb_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch, assert_no_new_children):
    pytest.importorskip("wandb")
    from rlhf_engine.telemetry.sinks import RUN_ID_FILE
    from tests.helpers.wandb_records import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for step in (1, 2):  # the first start, then a resume in the same run directory
        logger = MetricsLogger(tmp_path, loggers=["jsonl", "wandb"], progress=False, initial_step=step - 1)
        logger.log(step, {"env/reward_mean": float(step)})
        logger.close()
        ids.append((tmp_path / RUN_ID_FILE).read_text().strip())
        closed = int(time.time())  # W&B names an offline segment by the second it started in: keep the two apart
        wait_until(lambda: int(time.time()) > closed, 2, message="the next second")
    assert_no_new_children()
    run_id = ids[0]
    assert ids[1] == run_id
    assert len(run_id) >= 8
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # two offline segments of ONE W&B run (`wandb sync` uploads both into it), each with its own step
    assert len(run_dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in run_dirs)
    steps = [[r["_step"] for r in read_run(next(d.glob("run-*.wandb")))["history"]] for d in run_dirs]
    assert sorted(steps) == [[1], [2]]
    # a fresh run (from step 0) in the same directory is a new W&B run
    MetricsLogger(tmp_path, loggers=["jsonl", "wandb"], progress=False).close()
    assert (tmp_path / RUN_ID_FILE).read_text().strip() not in ("", run_id)
