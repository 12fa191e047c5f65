"""The async engine end to end: real generator processes, real transport, real vLLM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import run_config
from safetensors.torch import load_file

from rlhf_engine.common.checkpoint import latest_checkpoint, list_checkpoints, load_state
from rlhf_engine.common.procs import descendants
from rlhf_engine.engine.config import save_run_config
from rlhf_engine.engine.core import Callback, RLHFEngine
from rlhf_engine.telemetry.files import read_jsonl
from tests.helpers.waiting import wait_until


class Recorder(Callback):
    def __init__(self):
        self.steps, self.rollouts, self.checkpoints = [], 0, []

    def on_step(self, step, stats):
        self.steps.append(step)

    def on_rollout(self, rollout):
        self.rollouts += 1

    def on_checkpoint(self, path):
        self.checkpoints.append(path)


@pytest.mark.vllm
def test_async_run_with_vllm_generator(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    pytest.importorskip("vllm")
    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="vllm", total_steps=3, mode="async", max_staleness=1)
    rec = Recorder()
    with RLHFEngine(cfg, callbacks=[rec]) as engine:
        published = []
        publish = engine._port.publish_weights
        engine._port.publish_weights = lambda version, tensors: published.append(version) or publish(version, tensors)
        history = engine.train()
        summary = engine.summary()
        live = {k: v.clone() for k, v in engine.trainer.policy_state_dict().items()}
    assert_no_new_children()
    assert rec.steps == [1, 2, 3] and rec.rollouts >= 3 * 8 and len(rec.checkpoints) == 1
    assert published == [1, 2]  # the last step's weights go to the checkpoint only: no generator samples them
    assert all(h["off_policy/staleness_max"] <= 1 for h in history)
    # batch 1 was handed out before step 0 finished: sampled by version 0, trained at version 1
    assert history[1]["off_policy/staleness_max"] == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert set(summary["idle_fraction"]) == {"trainer", "generator-0"}
    assert all(0.0 <= f < 1.0 for f in summary["idle_fraction"].values())
    # the checkpoint's policy is an HF folder that transformers loads as is, with the trained weights
    from transformers import AutoModelForCausalLM

    ckpt = latest_checkpoint(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, live[name]), name
    assert load_state(ckpt)["trainer"]["policy_version"] == 3


def test_sync_resume_is_bit_exact(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    straight = run_config(tmp_path / "a", policy_dir, prompts_file, backend="transformers", total_steps=3, mode="sync",
                          save_steps=1)
    with RLHFEngine(straight) as engine:
        history = engine.train()
    assert all(h["off_policy/staleness_max"] == 0 for h in history)
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "run")] == ["step-00000002", "step-00000003"]  # keep_last

    # the same run stopped after step 3 was logged, before its checkpoint was written: it resumes from step 2
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step-00000003")
    interrupted = run_config(tmp_path / "b", policy_dir, prompts_file, backend="transformers", total_steps=3,
                             mode="sync", save_steps=1)
    with RLHFEngine(interrupted, resume=tmp_path / "b" / "run") as engine:
        assert engine.step == 2
        engine.train()
    assert_no_new_children()
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl")] == [1, 2, 3]

    a = latest_checkpoint(tmp_path / "a" / "run")
    b = latest_checkpoint(tmp_path / "b" / "run")
    assert a.name == b.name == "step-00000003"
    for name in ("policy/model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs after resume"
    sa, sb = load_state(a), load_state(b)
    assert sa["prompts"] == sb["prompts"] and sa["trainer"]["kl_ctl"] == sb["trainer"]["kl_ctl"]


def test_sigint_stops_all_processes_and_keeps_checkpoint(tmp_path, policy_dir, prompts_file):
    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="transformers", total_steps=1000, mode="async",
                     save_steps=1)
    config_path = tmp_path / "run.yaml"
    save_run_config(cfg, config_path)
    # SIGINT as from a terminal: a test run started in the background of a non-interactive shell (`make test &`,
    # nohup) has SIGINT ignored, and an ignored signal stays ignored across exec, so Python in the child would
    # install no KeyboardInterrupt handler and the engine would never see it
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", "ppo", "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def checkpointed() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            return bool(list_checkpoints(tmp_path / "run"))

        wait_until(checkpointed, 180, interval_s=0.2, message="a checkpoint")
        family = descendants(proc.pid)
        assert family, "the engine should have a generator child"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the engine did not stop within 30 s of SIGINT; its output:\n" + proc.communicate()[0][-4000:])
        stopped_s = time.monotonic() - t0
        print(f"\nstopped {stopped_s:.1f} s after SIGINT")
        assert stopped_s < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    wait_until(lambda: not [p for p in family if Path(f"/proc/{p}").exists()], 5, message="no child outliving the engine")
    ckpt = latest_checkpoint(tmp_path / "run")
    state = load_state(ckpt)
    assert state["step"] >= 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt / "policy")


def test_cli_config_errors_name_key_and_file(tmp_path, policy_dir, prompts_file):
    good = (f"model: {{policy: {policy_dir}, reward_fn: 'rlhf_engine.demo:gold_scores'}}\n"
            f"data: {{prompts: {prompts_file}}}\nppo: {{init_kl_coef: 0.1}}\n")
    (tmp_path / "bad.yaml").write_text(good.replace("init_kl_coef", "init_kl_coeff"))
    (tmp_path / "good.yaml").write_text(good)
    # both processes at once (most of each is Python's imports)
    procs = [subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", "ppo", "--config", str(tmp_path / name), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in (("bad.yaml", []), ("good.yaml", ["--set", "engine.mode=turbo"]))]
    try:
        (err, code), (err_set, code_set) = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()  # when one timed out (a no-op on an ended process)
            p.wait()
    assert code == 2
    assert f"{tmp_path / 'bad.yaml'}:3: unknown key(s) 'ppo.init_kl_coeff'" in err
    assert code_set == 2 and "engine.mode = 'turbo'; expected one of 'async', 'sync'" in err_set


def test_generator_failing_to_start_is_reported(tmp_path, policy_dir, prompts_file, assert_no_new_children):
    cfg = run_config(tmp_path, policy_dir, prompts_file, backend="transformers", total_steps=1)
    cfg.generator.model = str(tmp_path / "missing")  # the child cannot load it
    cfg.model.policy = str(policy_dir)
    with pytest.raises(RuntimeError, match=r"generator-0 exited with code \d+ before its handshake; see .*generator-0.log") as e:
        RLHFEngine(cfg).start()
    # the last lines of the child's log say why: its config names a generator model that is not the policy
    assert "its last lines:\n" in str(e.value) and "  | rlhf-engine generator: config error:" in str(e.value)
    assert_no_new_children()


def test_cli_errors_are_one_line_with_status_2(tmp_path, policy_dir, prompts_file, capsys):
    from rlhf_engine.cli import main
    from rlhf_engine.common.config_io import ConfigError

    good = f"model: {{policy: {policy_dir}, reward_fn: 'rlhf_engine.demo:gold_scores'}}\ndata: {{prompts: {prompts_file}}}\n"
    cases = {
        "missing folder": (good.replace(str(policy_dir), str(tmp_path / "nope")), [],
                           f"model.policy: no such model folder: {tmp_path / 'nope'}"),
        "too long": (good, ["--set", "data.max_prompt_length=500", "--set", "ppo.response_length=64"],
                     "data.max_prompt_length (500) + ppo.response_length (64) = 564 exceeds the policy's "
                     "max_position_embeddings (512)"),
        "max_model_len": (good, ["--set", "generator.max_model_len=100"],
                          "= 320 exceeds generator.max_model_len (100)"),
        "optional section": (good + "generator:\n  kv_cache_bytes: lots\n", [],
                             ":4: generator.kv_cache_bytes = 'lots' must be an integer"),
        "bad data": (good.replace(str(prompts_file), str(tmp_path / "bad.jsonl")), [], f"{tmp_path / 'bad.jsonl'}:2: "),
        "no resume": (good, ["--resume", tmp_path / "nothing"], f"--resume {tmp_path / 'nothing'}: no complete checkpoint"),
        "environment": (good, ["--set", "generator.environment=my_envs:Nope"],
                        "generator.environment.name ('my_envs:Nope') does not resolve: No module named 'my_envs'"),
        "no reward": (good.replace(", reward_fn: 'rlhf_engine.demo:gold_scores'", ""), [],
                      "give model.reward_model or model.reward_fn (or a generator.environment"),
    }
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    sigterm = signal.getsignal(signal.SIGTERM)  # main() turns SIGTERM into KeyboardInterrupt
    try:
        for name, (text, extra, expected) in cases.items():
            path = tmp_path / f"{name.replace(' ', '_')}.yaml"
            path.write_text(text)
            code = main(["ppo", "--config", str(path), "--set", f"engine.run_dir={tmp_path / 'run'}",
                         *map(str, extra)])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("rlhf-engine ppo:")]
            assert code == 2 and len(lines) == 1 and expected in lines[0], (name, err[-2000:])
        with pytest.raises(ConfigError, match=r"^model.policy: no such model folder"):
            main(["--debug", "ppo", "--config", str(tmp_path / "missing_folder.yaml")])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    # the real process: status 2 and one line
    res = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "ppo", "--config", str(tmp_path / "nowhere.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"rlhf-engine ppo: config error: config file {tmp_path / 'nowhere.yaml'} does not exist"]
