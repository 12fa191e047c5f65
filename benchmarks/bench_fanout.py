"""Weight fan-out on the trainer: what one publish costs with 1, 2 and 4 generators on this host (ipc + one
shared-memory segment per version) and with 1, 2 and 4 generators on "another host" (tcp with CURVE on
loopback, the trainer's shared memory off), with the relay off (one copy of the weights per generator on
the wire) and on (`transport.relay`: one copy per host, to one generator that hands it to the others
through its own shared memory; the generators have `weights_via_shm: true`).

For each setting the trainer publishes `--reps` versions of a state dict of `--mib` MiB (default: the
38 M-parameter benchmark Llama in fp32, 151 MiB) to N generator processes that wait for each version and
ack it (`bench_weight_sync.weights_generator`, without copying it into a model). Reported per version:

- publish_s   the trainer's `publish_weights` call (what the training loop waits for)
- acked_s     until every generator has acked (the update is delivered everywhere)
- trainer_cpu_s  CPU seconds of the trainer process over the whole round (its fan-out work)
- frame_copies   copies of the weights the trainer sent as socket frames per version (0 on shared memory)

The first version is left out (it maps and faults in fresh pages). On a shared machine compare settings
by their ratios within one run; the load average is recorded.

Usage: python benchmarks/bench_fanout.py [--mib 151] [--reps 5] [--out benchmarks/results/fanout_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weight_sync import specs_of, weights_generator  # noqa: E402
from provenance import Provenance  # noqa: E402

from rlhf_engine.transport import TrainerPort, TransportConfig, generate_keys  # noqa: E402
from rlhf_engine.transport.weights import model_fingerprint, state_dict_specs  # noqa: E402

SETTINGS = (("local", 1, False), ("local", 2, False), ("local", 4, False),
            ("tcp", 1, False), ("tcp", 2, False), ("tcp", 4, False), ("tcp", 1, True), ("tcp", 2, True), ("tcp", 4, True))
"""(where, generators, relay)."""


def make_state_dict(mib: float) -> dict[str, torch.Tensor]:
    """fp32 tensors of 4 MiB (a 1024 x 1024 layer) adding up to about `mib` MiB."""
    return {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(max(1, round(mib / 4)))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(sd: dict[str, torch.Tensor], where: str, generators: int, relay: bool, reps: int,
                workdir: str) -> dict:
    fingerprint = model_fingerprint(state_dict_specs(sd))
    if where == "local":
        config = gen_config = TransportConfig(endpoint=f"ipc://{workdir}/{where}{generators}", weights_via_shm=True,
                                              ack_timeout_s=600)
    else:
        keys = os.path.join(workdir, f"keys{generators}{relay}")
        generate_keys(keys)
        config = TransportConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", weights_via_shm=False,
                                 ack_timeout_s=600, curve_keys_dir=keys, relay=relay)
        gen_config = dataclasses.replace(config, weights_via_shm=relay)  # with it: relay-capable
    ctx = mp.get_context("spawn")
    rounds = []
    with TrainerPort(config, fingerprint, weight_specs=specs_of(sd)) as trainer:
        procs = [ctx.Process(target=weights_generator, args=(gen_config, fingerprint, specs_of(sd), False, reps + 1))
                 for _ in range(generators)]
        for p in procs:
            p.start()
        try:
            trainer.wait_for_generators(generators, timeout_s=180)
            for version in range(1, reps + 2):
                c0, t0, b0 = time.process_time(), time.perf_counter(), trainer.stats()["control"].get("weight_bytes_sent", 0)
                trainer.publish_weights(version, sd)
                t1 = time.perf_counter()
                trainer.wait_for_acks(version, timeout_s=600)
                rounds.append({"publish_s": t1 - t0, "acked_s": time.perf_counter() - t0,
                               "trainer_cpu_s": time.process_time() - c0,
                               "frame_bytes": trainer.stats()["control"].get("weight_bytes_sent", 0) - b0})
            trainer.shutdown_generators()
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
                    p.join()
    steady = rounds[1:]
    return {"where": where, "generators": generators, "relay": relay, "rounds": rounds,
            **{k: statistics.median(r[k] for r in steady) for k in ("publish_s", "acked_s", "trainer_cpu_s")},
            "frame_copies": statistics.median(r["frame_bytes"] for r in steady) / sum(
                t.numel() * t.element_size() for t in sd.values())}


def label(r: dict) -> str:
    return f"{r['where']} x{r['generators']}" + (" relay" if r["relay"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=151.0, help="state dict size (default: 38 M fp32 parameters)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fanout_cpu.json"))
    args = parser.parse_args()
    sd = make_state_dict(args.mib)
    size_mib = sum(t.numel() * t.element_size() for t in sd.values()) / (1 << 20)
    run = Provenance.start("fanout")
    results = []
    with tempfile.TemporaryDirectory(prefix="fanout-") as workdir:
        for where, n, relay in SETTINGS:
            results.append(run_setting(sd, where, n, relay, args.reps, workdir))
            r = results[-1]
            print(f"{label(r):15s}: publish {r['publish_s'] * 1e3:8.1f} ms  all acked {r['acked_s'] * 1e3:8.1f} ms  "
                  f"trainer CPU {r['trainer_cpu_s'] * 1e3:8.1f} ms", flush=True)
    base = {(r["where"], r["relay"]): r for r in results if r["generators"] == 1}
    print(f"\nweight fan-out, {size_mib:.0f} MiB per version, median of {args.reps} versions")
    print(f"{'setting':15s} {'publish ms':>10s} {'acked ms':>9s} {'trainer CPU ms':>15s} {'tcp copies':>11s} "
          f"{'acked / 1 gen':>14s}")
    for r in results:
        ratio = r["acked_s"] / base[r["where"], r["relay"]]["acked_s"]
        print(f"{label(r):15s} {r['publish_s'] * 1e3:10.1f} {r['acked_s'] * 1e3:9.1f} "
              f"{r['trainer_cpu_s'] * 1e3:15.1f} {r['frame_copies']:11.0f} {ratio:13.2f}x")
    run.write(args.out, {"state_dict_mib": size_mib, "reps": args.reps, "results": results})

if __name__ == "__main__":
    main()
