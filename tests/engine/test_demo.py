"""The demo pipeline (SFT -> reward model -> async PPO -> gold evaluation) on a very small budget."""

import json
from rlhf_engine.demo import run_demo


def test_demo_pipeline_small_budget(tmp_path, capsys, assert_no_new_children):
    result = run_demo(tmp_path / "demo", small=True, backend="transformers")
    out = capsys.readouterr().out
    assert "gold score, PPO policy" in out and "reward-model eval accuracy" in out
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["ppo_steps"] == result["ppo_steps"] == 2
    for key in ("gold_sft", "gold_ppo", "rm_accuracy", "final_kl"):
        assert isinstance(saved[key], float), key
    assert 0.0 <= saved["rm_accuracy"] <= 1.0
    # every stage left its artefact: HF folders, the PPO run with checkpoint and plots
    for folder in ("base", "sft", "reward", "ppo_policy"):
        assert (tmp_path / "demo" / folder / "config.json").is_file(), folder
    assert (tmp_path / "demo" / "ppo" / "checkpoints" / "step-00000002" / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "ppo" / "plots" / "reward.png").is_file()
    assert (tmp_path / "demo" / "ppo" / "plots" / "timeline.png").is_file()
    assert_no_new_children()
