"""First contact with the command line: every error one line naming the setting, status 2, checked
before any work (no cpu plan, no run folder, no process), no traceback without --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_engine.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def write_config(folder, policy_dir, prompts_file):
    path = folder / "run.yaml"
    path.write_text(f"model: {{policy: {policy_dir}, reward_fn: 'rlhf_engine.demo:gold_scores'}}\n"
                    f"data: {{prompts: {prompts_file}}}\nengine: {{run_dir: {folder / 'run'}}}\n")
    return path


@pytest.fixture
def config(tmp_path, policy_dir, prompts_file):
    return write_config(tmp_path, policy_dir, prompts_file)


CONFIG_ERRORS = [
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
    ("transport.ipc_dir={tmp}/" + "d" * 100,
     ("config error: {config} (with --set): invalid transport: transport.ipc_dir '{tmp}/" + "d" * 100 + "' is too "
      "long for its sockets: their paths would have up to ")),
    ("ppo.batch_sise=8",
     ("config error: {config} (with --set): unknown key(s) 'ppo.batch_sise' in section 'ppo'; did you mean "
     "'batch_size'?; known keys: adap_kl_ctrl, ")),
]


@pytest.fixture(scope="module")
def config_error_runs(tmp_path_factory, policy_dir, prompts_file):
    """`rlhf-engine ppo --set OVERRIDE` of each case in CONFIG_ERRORS, all at once (each a process of its own with a
    config and run folder of its own; most of each is Python's imports): {override: (folder, config, result)}."""
    started = {}
    for i, (override, _) in enumerate(CONFIG_ERRORS):
        folder = tmp_path_factory.mktemp(f"config_error{i}")
        config = write_config(folder, policy_dir, prompts_file)
        extra = ["--set", "engine.eval_steps=1"] if "eval_prompts" in override else []
        argv = ["ppo", "--config", config, "--set", override.format(tmp=folder, config=config), *extra]
        started[override] = folder, config, subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", *map(str, argv)],
                                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = {}
    try:
        for override, (folder, config, proc) in started.items():
            out, err = proc.communicate(timeout=120)
            runs[override] = folder, config, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for *_, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


@pytest.mark.parametrize("override, message", CONFIG_ERRORS)
def test_config_errors_are_one_line_before_any_work(config_error_runs, override, message):
    folder, config, res = config_error_runs[override]
    fill = {"tmp": folder, "config": config}
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlhf-engine ppo: {message.format(**fill)}"), res.stderr[-2000:]
    assert not (folder / "run").exists()  # nothing was planned, written or started
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
    # both runs at once (each a process of its own; most of each is Python's imports)
    quiet, verbose = [subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", *argv, "--config", str(config),
                                        "--set", f"output_dir={tmp_path / out}"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      for argv, out in ((["reward"], "rm"), (["-v", "reward"], "rm2"))]
    try:
        outputs = [p.communicate(timeout=120) for p in (quiet, verbose)]
        res, res_verbose = [subprocess.CompletedProcess(p.args, p.returncode, *out)
                            for p, out in zip((quiet, verbose), outputs)]
    finally:
        for p in (quiet, verbose):
            p.kill()  # when one timed out (a no-op on an ended process)
            p.wait()
    assert res.returncode == 0, res.stderr[-2000:]
    # a causal LM under a score head: one line of ours instead of transformers' load report
    assert f"INFO rlhf_engine.models.reward_scoring: reward head initialised fresh on top of {policy_dir} " \
           "(score.weight)" in res.stderr
    for noise in ("LOAD REPORT", "UNEXPECTED", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in res.stderr, res.stderr[-2000:]
    assert res_verbose.returncode == 0, res_verbose.stderr[-2000:]
    assert "Loading weights" in res_verbose.stderr and "LOAD REPORT" in res_verbose.stderr
