"""A reward function for fault tests of trainer ranks (`model.reward_fn: tests.helpers.faults:scores`): the demo's
gold scores, a record of the prompts each call scored, and a failure injected on one rank.

Each trainer rank scores its share of every step (`PPOTrainer.score`), so a rank's k-th call is its share of the
k-th step of its attempt. The test sets, in the run's environment:
- FAULT_LOG: a folder; each call appends `{"job": torchrun's run id, "call": k, "prompts": [...]}` to
  `rank-<RANK>.jsonl`;
- FAULT_RANK, FAULT_CALL (optional): the FAULT_CALL-th call on rank FAULT_RANK writes the time to `fault-time`
  and raises `RuntimeError`, once (not again in a job that continues the run).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlhf_engine.demo import gold_scores

_calls = 0


def scores(prompts: list[str], completions: list[str]) -> list[float]:
    global _calls
    _calls += 1
    rank = int(os.environ.get("RANK", "0"))
    log = Path(os.environ["FAULT_LOG"])
    with open(log / f"rank-{rank}.jsonl", "a") as f:
        f.write(json.dumps({"job": os.environ.get("TORCHELASTIC_RUN_ID", ""), "call": _calls,
                            "prompts": list(prompts)}) + "\n")
    if (os.environ.get("FAULT_RANK") == str(rank) and os.environ.get("FAULT_CALL") == str(_calls)
            and not (log / "fault-time").exists()):
        (log / "fault-time").write_text(repr(time.time()))
        raise RuntimeError(f"injected fault on rank {rank} at call {_calls}")
    return gold_scores(prompts, completions)


def steps(log: Path, job: int | None = None) -> list[list[str]]:
    """The sorted prompts of each step that every rank scored (of the `job`-th torchrun job only, when given):
    a step that one rank scored and another not (the fault's) is left out."""
    by_rank = []
    for path in sorted(log.glob("rank-*.jsonl")):
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        jobs = list(dict.fromkeys(c["job"] for c in calls))
        by_rank.append([c["prompts"] for c in calls if job is None or c["job"] == jobs[job]])
    return [sorted(p for calls in by_rank for p in calls[k]) for k in range(min(map(len, by_rank)))]
