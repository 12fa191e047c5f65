"""Run one variant of the end-to-end benchmark in this (fresh) process and write what it measured.

    python benchmarks/e2e/run_variant.py SPEC.json RESULT.json

SPEC.json holds `{"config": <load_run_config base tree>, "steps": N, "save_policy": bool}` (see
`workload.run_config`): the run stops after N of the config's total_steps (N + lookahead), as a longer run
would look at step N (the generators busy with the batches ahead) and without the final checkpoint; with
`save_policy`, a checkpoint of step N is written after the measured run (for the held-out evaluation). Each
variant runs in its own process so that its CPU pinning and thread counts start from a clean
slate (the engine pins this process's main thread before torch starts its thread pool).

RESULT.json: the per-step metrics rows, the busy-interval timeline, the wall-clock start of
the measured run (after the generators' handshake), and each generator's `LoopStats` (its
exact seconds generating and applying weights), read from its log at exit, and the peak resident set of
the trainer and of the largest generator.
"""

from __future__ import annotations

import ast
import re
import resource
import sys
import time
from pathlib import Path

_STATS_LINE = re.compile(r" stats: (\{.*\})\s*$")


def loop_stats(run_dir: Path) -> dict[str, dict]:
    """`LoopStats` of every generator (by log name: `generator-i`), from the `<sender> stats: {...}`
    line its process logs at exit."""
    out = {}
    for log in sorted(run_dir.glob("generator-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _STATS_LINE.search(line)
            if m:
                out[log.stem] = ast.literal_eval(m.group(1))  # a dict of numbers: literal_eval, never eval
    return out


def run(spec: dict) -> dict:
    from rlhf_engine.engine.config import load_run_config
    from rlhf_engine.engine.core import RLHFEngine
    from rlhf_engine.telemetry.files import METRICS_FILE, TIMELINE_FILE, read_jsonl
    from rlhf_engine.trainer.ppo.checkpoint import POLICY_DIR

    config = load_run_config(None, base=spec["config"])
    run_dir = Path(config.engine.run_dir)
    t_launch = time.time()
    with RLHFEngine(config) as engine:
        t_start = time.time()  # generators connected, models loaded: the measured run starts here
        cpu_plan = engine.cpu_plan.describe()
        for _ in engine.steps():
            if engine.step >= spec["steps"]:
                break
        t_end = time.time()
        policy = str(engine.save_checkpoint() / POLICY_DIR) if spec.get("save_policy") else None
    return {
        "mode": config.engine.mode,
        "cpu_plan": cpu_plan,  # which process had which cores and threads in each phase
        "rows": read_jsonl(run_dir / METRICS_FILE),  # the step metrics with their end times
        "timeline": read_jsonl(run_dir / TIMELINE_FILE),
        "t_launch": t_launch,
        "t_start": t_start,
        "t_end": t_end,
        "t_stopped": time.time(),
        "loop_stats": loop_stats(run_dir),
        "policy": policy,  # the HF folder of the policy after `steps` (save_policy), else None
        # peak resident set (Linux: KiB): this process (the trainer), and the largest of its ended children
        # (a generator; the engine has reaped them all when it closed)
        "peak_rss_mib": {"trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "generator": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024},
    }


if __name__ == "__main__":
    from child import spec_main  # this folder is the script's

    sys.exit(spec_main(run, __doc__))
