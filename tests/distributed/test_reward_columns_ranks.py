"""The prompt records' fields under two trainer ranks: broadcast with the batch, each rank's reward function
gets its share's fields (gloo, CPU)."""

import json

from tests.distributed.conftest import run_group, torchrun_cmd


def test_each_rank_scores_its_share_with_its_fields(tmp_path):
    proc = run_group(torchrun_cmd(2, "reward_columns.py", str(tmp_path)), timeout=150)
    assert proc.returncode == 0, proc.stdout[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        # the whole batch's columns on every rank, JSON values as sent
        assert seen["columns"] == {"answer": [1, 1, 2, 2], "meta": [{"k": "é"}, {"k": "é"}, None, None]}
        # rank r scores samples 2r, 2r + 1 (one group each), with those samples' fields
        assert seen["seen"] == [{"answer": [r + 1, r + 1], "meta": [{"k": "é"}] * 2 if r == 0 else [None, None]}]
        assert seen["scores"] == [1.0, 1.0, 2.0, 2.0]  # gathered in sample order
