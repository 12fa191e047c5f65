"""Held-out evaluation with 2 trainer ranks (`rlhf-engine ppo --nproc 2`): the eval samples are scored on both
ranks (an odd count, padded to split evenly) with the records' fields, and give the single-process numbers."""

from __future__ import annotations

import json
import uuid

import yaml

from rlhf_engine.data import synthetic
from tests.distributed.conftest import run_group
from tests.distributed.engine_runs import MARK, assert_none_left, metrics, ppo_cmd, write_config


def test_eval_on_two_ranks_equals_one_process(tmp_path, files):
    policy, _ = files
    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    for path, n, seed in ((prompts, 32, 0), (held_out, 5, 1)):  # 5 eval samples: 3 + 3 on two ranks, one padded
        path.write_text("".join(json.dumps({"prompt": p, "n": 1000 * i}) + "\n"
                                for i, p in enumerate(synthetic.prompts(n, seed=seed))))
    runs = {}
    for name, extra in (("ranks", ["--nproc", "2"]), ("plain", [])):
        config = write_config(tmp_path / name, (policy, prompts), reward_fn="tests.helpers.columns:length_plus_n",
                              total_steps=1, mode="sync", num_generators=1, eval_steps=1)
        data = yaml.safe_load(config.read_text())
        data["data"]["eval_prompts"] = str(held_out)
        config.write_text(yaml.safe_dump(data))
        mark = uuid.uuid4().hex
        proc = run_group(ppo_cmd(config, *extra), timeout=240, env={MARK: mark})
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert_none_left(mark)
        runs[name] = metrics(tmp_path / name / "run")
    for name, rows in runs.items():
        assert sorted(rows) == [0, 1], name
        assert [rows[s]["eval/policy_version"] for s in (0, 1)] == [0, 1] and rows[0]["eval/samples"] == 5
        # each completion scored with its own record's n (0, 1000, ..., 4000): a mean above 2000
        assert 2000 < rows[0]["eval/reward_mean"] < 2000 + 200
    # the initial policy, the same seeds: the same completions, the same scores whichever ranks score them
    assert runs["ranks"][0]["eval/reward_mean"] == runs["plain"][0]["eval/reward_mean"]
