"""First contact with the command line: every error one line naming the setting, status 2, checked
before any work (no cpu plan, no run folder, no process), no traceback without --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_engine.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def config(tmp_path, policy_dir, prompts_file):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{policy: {policy_dir}, reward_fn: 'rlhf_engine.demo:gold_scores'}}\n"
                    f"data: {{prompts: {prompts_file}}}\nengine: {{run_dir: {tmp_path / 'run'}}}\n")
    return path


@pytest.mark.parametrize("override, message", [
    ("transport.endpoint=tcp://127.0.0.1:5599",
     ("transport error: transport.endpoint 'tcp://127.0.0.1:5599' is tcp without CURVE keys: set "
     "transport.curve_keys_dir (create keys with `rlhf-engine keys DIR`) or transport.allow_insecure: true")),
    ("transport.curve_keys_dir={tmp}/nokeys",
     "config error: transport.curve_keys_dir: CURVE keys folder {tmp}/nokeys is incomplete"),
    ("model.reward_fn=no_such_module:score",
     ("config error: model.reward_fn: cannot import module 'no_such_module' of 'no_such_module:score': "
     "No module named 'no_such_module'")),
    ("model.gold_fn=rlhf_engine.demo:no_such_function",
     ("config error: model.gold_fn: 'rlhf_engine.demo:no_such_function': module 'rlhf_engine.demo' has no "
     "function 'no_such_function'")),
    ("data.eval_prompts={tmp}/none.jsonl",
     "config error: data.eval_prompts: no such file or folder: {tmp}/none.jsonl"),
    ("ppo.batch_sise=8",
     ("config error: {config} (with --set): unknown key(s) 'ppo.batch_sise' in section 'ppo'; did you mean "
     "'batch_size'?; known keys: adap_kl_ctrl, ")),
])
def test_config_errors_are_one_line_before_any_work(tmp_path, config, override, message):
    fill = {"tmp": tmp_path, "config": config}
    extra = ["--set", "engine.eval_steps=1"] if "eval_prompts" in override else []
    res = _cli("ppo", "--config", config, "--set", override.format(**fill), *extra)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlhf-engine ppo: {message.format(**fill)}"), res.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing was planned, written or started
    assert "Traceback" not in res.stderr and "cpu plan" not in res.stderr


def test_debug_shows_the_traceback(tmp_path, config):
    res = _cli("--debug", "ppo", "--config", config, "--set", "transport.endpoint=tcp://127.0.0.1:5599")
    assert res.returncode == 1 and "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("rlhf_engine.transport.errors.InsecureEndpointError: ")


def test_generator_command_insecure_endpoint_is_one_line(tmp_path, config):
    res = _cli("generator", "--config", config, "--connect", "tcp://127.0.0.1:5599")
    assert res.returncode == 2 and res.stderr.splitlines() == [
        ("rlhf-engine generator: transport error: transport.endpoint 'tcp://127.0.0.1:5599' is tcp without CURVE "
        "keys: set transport.curve_keys_dir (create keys with `rlhf-engine keys DIR`) or transport.allow_insecure: true")]


@pytest.mark.parametrize(("resume", "continues_in"), [("run", "run"), ("run/checkpoints/step-00000002", "other")])
def test_resume_continues_in_the_resumed_run_folder(tmp_path, config, resume, continues_in):
    from rlhf_engine.cli import _ppo_config, build_parser

    # the config names another run folder (the original run set engine.run_dir with --set): a run folder given to
    # --resume is where the run continues; a chosen checkpoint starts a branch in the config's run folder
    args = build_parser().parse_args(["ppo", "--config", str(config), "--set", f"engine.run_dir={tmp_path / 'other'}",
                                      "--set", "engine.total_steps=7", "--resume", str(tmp_path / resume)])
    cfg = _ppo_config(args)
    assert cfg.engine.run_dir == str(tmp_path / continues_in) and cfg.engine.total_steps == 7


def test_reward_stage_shows_our_lines_only_unless_verbose(tmp_path, policy_dir):
    import json

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"1+{i}=", "chosen": str(i + 1), "rejected": "x"}) + "\n"
                             for i in range(8)))
    config = tmp_path / "rm.yaml"
    config.write_text(f"model_name_or_path: {policy_dir}\ntrain_file: {pairs}\noutput_dir: {tmp_path / 'rm'}\n"
                      "max_steps: 1\nper_device_train_batch_size: 4\ndevice: cpu\n")
    res = _cli("reward", "--config", config)
    assert res.returncode == 0, res.stderr[-2000:]
    # a causal LM under a score head: one line of ours instead of transformers' load report
    assert f"INFO rlhf_engine.models.reward_scoring: reward head initialised fresh on top of {policy_dir} " \
           "(score.weight)" in res.stderr
    for noise in ("LOAD REPORT", "UNEXPECTED", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in res.stderr, res.stderr[-2000:]
    res = _cli("-v", "reward", "--config", config, "--set", f"output_dir={tmp_path / 'rm2'}")
    assert res.returncode == 0 and "Loading weights" in res.stderr and "LOAD REPORT" in res.stderr
