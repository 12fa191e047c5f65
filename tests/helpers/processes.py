"""Process entry points for the rollout process tests (run as `python -m` from the repository root, so
they are spawn-safe).

    python -m tests.helpers.processes generator '<json>'   run_generator with {"generator": {...}, "transport": {...}}
    python -m tests.helpers.processes parent '<json>'      a stand-in trainer: binds a TrainerPort, starts generators
                                                          (one per entry of "children": "pdeathsig" or "plain"),
                                                          prints "ready <pid> <pid>..." after their handshakes, then sleeps
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def generator_main(spec: dict) -> int:
    from rlhf_engine.rollout.config import GeneratorConfig
    from rlhf_engine.rollout.process import run_generator
    from rlhf_engine.transport import TransportConfig

    stats = run_generator(GeneratorConfig(**spec["generator"]), TransportConfig(**spec["transport"]), name="child")
    print(f"stats {stats.batches} {stats.rollouts}", flush=True)
    return 0


def parent_main(spec: dict) -> int:
    from rlhf_engine.common.procs import start_child
    from rlhf_engine.transport import TrainerPort, TransportConfig
    from rlhf_engine.transport.weights import dir_fingerprint

    port = TrainerPort(TransportConfig(**spec["transport"]), dir_fingerprint(spec["generator"]["model"]))
    args = ["-m", "tests.helpers.processes", "generator", json.dumps(spec)]
    children = []
    for kind in spec["children"]:
        if kind == "pdeathsig":
            children.append(start_child(args))
        else:  # a plain child: only the heartbeat tells it that we are gone
            children.append(subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL))
    port.wait_for_generators(len(children), timeout_s=spec.get("start_timeout_s", 120.0))
    print("ready", *(c.pid for c in children), flush=True)
    while True:  # until killed
        time.sleep(1.0)


if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    sys.exit(generator_main(spec) if sys.argv[1] == "generator" else parent_main(spec))
