"""Weight sync and rollout throughput of rlhf_engine.transport, trainer -> generator process.

Sends SIZE GiB of bf16 tensors (default 1) from this process (the trainer) to a spawned
generator process and reports GB/s for:

- memcpy         one in-process ``copy_`` of the same bytes into preallocated tensors (the bar)
- ipc+shm        our same-host path: one copy into a shared-memory buffer, header over ipc://
- ipc frames     tensors as zero-copy ZeroMQ frames over ipc:// (shared memory disabled)
- tcp frames     tensors as zero-copy ZeroMQ frames over tcp://127.0.0.1 with CURVE (the other-host
                 path: every tcp endpoint is encrypted and authenticated)
- pickle         ``pickle.dumps(state_dict)`` over a PUSH/PULL ipc:// socket, ``pickle.loads``
                 in the generator (the baseline; pickle is used only here, never in the engine)

"delivered" = from the trainer starting to send until the generator holds the complete
update and its ack is back; "applied" = the generator also copies the update into its own
preallocated tensors before acking (what loading it into a model costs). Then rollouts/s
for rollout messages (one `Sample` each) of realistic sizes, generator process -> trainer over ipc://.

Usage: python benchmarks/bench_weight_sync.py [--gib 1] [--reps 5] [--out benchmarks/results/weight_sync_cpu.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time

import torch
import zmq
from provenance import Provenance

from rlhf_engine.transport import GeneratorPort, Sample, ShutdownRequested, TrainerPort, TransportConfig, generate_keys
from rlhf_engine.transport.weights import model_fingerprint, state_dict_specs

TENSOR_BYTES = 16 << 20  # 16 MiB per tensor, like a large linear layer shard


def make_state_dict(gib: float) -> dict[str, torch.Tensor]:
    n = int(gib * (1 << 30)) // TENSOR_BYTES
    return {f"layers.{i}.weight": torch.randn(TENSOR_BYTES // 2 // 4096, 4096).bfloat16() for i in range(n)}


def specs_of(sd):
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]


# ---- generator process ---------------------------------------------------------------
def weights_generator(config: TransportConfig, fingerprint: str, specs, apply: bool, reps: int) -> None:
    own = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in specs} if apply else {}
    with GeneratorPort(config, fingerprint, weight_specs=specs) as port:
        for version in range(1, reps + 1):
            update = port.wait_weights(version, timeout_s=600)
            if apply:
                for name, tensor in update.tensors.items():
                    own[name].copy_(tensor)
            update.ack()
        try:
            port.recv_prompts(timeout_s=60)
        except ShutdownRequested:
            pass


def pickle_generator(endpoint: str, reps: int) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(endpoint + ".data")
    push.connect(endpoint + ".ack")
    for _ in range(reps):
        sd = pickle.loads(pull.recv(copy=False).buffer)
        push.send(str(len(sd)).encode())
    pull.close(linger=0)
    push.close(linger=1000)
    ctx.term()


def rollout_generator(config: TransportConfig, prompt_len: int, response_len: int, n: int) -> None:
    rollouts = [Sample(f"r{i}", i, torch.randint(0, 32000, (prompt_len,)), torch.randint(0, 32000, (response_len,)),
                       -torch.rand(response_len), 0, "length", generation_time=1.0) for i in range(min(n, 512))]
    with GeneratorPort(config, "rollouts") as port:
        for i in range(n):
            r = rollouts[i % len(rollouts)]
            port.send_rollout(Sample(f"r{i}", i, r.prompt_ids, r.response_ids, r.behaviour_logp, r.policy_versions,
                                     "length", r.loss_mask, generation_time=1.0))
        port.flush(600)
        try:
            port.recv_prompts(timeout_s=60)
        except ShutdownRequested:
            pass


# ---- measurements --------------------------------------------------------------------
class Memcpy:
    """The bar: one in-process ``copy_`` of the same bytes into preallocated tensors.

    Timed right before every timed round of every path, so that each path is compared with
    a memcpy taken under the same machine load (this machine is shared)."""

    def __init__(self, sd):
        self.sd = sd
        self.dst = {k: torch.empty_like(v) for k, v in sd.items()}
        self.once()  # fault in the destination pages

    def once(self) -> float:
        start = time.perf_counter()
        for k, v in self.sd.items():
            self.dst[k].copy_(v)
        return time.perf_counter() - start


def child_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_memcpy(memcpy, reps):
    times, cpus = [], []
    for _ in range(reps):
        c0 = time.process_time()
        times.append(memcpy.once())
        cpus.append(time.process_time() - c0)
    return times, [memcpy.once() for _ in range(reps)], cpus


def bench_transport(sd, memcpy, endpoint, shm, apply, reps):
    fp = model_fingerprint(state_dict_specs(sd))
    keys = None
    if endpoint.startswith("tcp://"):
        keys = os.path.join(tempfile.mkdtemp(prefix="bws-"), "keys")
        generate_keys(keys)
    config = TransportConfig(endpoint=endpoint, weights_via_shm=shm, ack_timeout_s=600, curve_keys_dir=keys)
    ctx = mp.get_context("spawn")
    with TrainerPort(config, fp, weight_specs=specs_of(sd)) as trainer:
        proc = ctx.Process(target=weights_generator, args=(config, fp, specs_of(sd), apply, reps + 1))
        proc.start()
        trainer.wait_for_generators(1, timeout_s=120)
        times, bars, cpus = [], [], []
        for version in range(1, reps + 2):
            bars.append(memcpy.once())
            c0 = time.process_time() + child_cpu_s(proc.pid)
            start = time.perf_counter()
            trainer.publish_weights(version, sd)
            trainer.wait_for_acks(version, timeout_s=600)
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() + child_cpu_s(proc.pid) - c0)
        trainer.shutdown_generators()
        proc.join(60)
    return times[1:], bars[1:], cpus[1:]  # the first round maps / faults in fresh pages on both sides


def bench_pickle(sd, memcpy, reps):
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='bws-')}/pickle"
    zctx = zmq.Context()
    push, pull = zctx.socket(zmq.PUSH), zctx.socket(zmq.PULL)
    push.bind(endpoint + ".data")
    pull.bind(endpoint + ".ack")
    proc = mp.get_context("spawn").Process(target=pickle_generator, args=(endpoint, reps + 1))
    proc.start()
    times, bars, cpus = [], [], []
    for _ in range(reps + 1):
        bars.append(memcpy.once())
        c0 = time.process_time() + child_cpu_s(proc.pid)
        start = time.perf_counter()
        push.send(pickle.dumps(sd, protocol=pickle.HIGHEST_PROTOCOL), copy=False)
        pull.recv()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() + child_cpu_s(proc.pid) - c0)
    proc.join(60)
    push.close(linger=0)
    pull.close(linger=0)
    zctx.term()
    return times[1:], bars[1:], cpus[1:]


def bench_rollouts(prompt_len, response_len, n):
    config = TransportConfig(endpoint=f"ipc://{tempfile.mkdtemp(prefix='bws-')}/ep", max_prompt_tokens=prompt_len,
                             max_response_tokens=response_len)
    with TrainerPort(config, "rollouts") as trainer:
        proc = mp.get_context("spawn").Process(target=rollout_generator, args=(config, prompt_len, response_len, n))
        proc.start()
        trainer.wait_for_generators(1, timeout_s=120)
        first = trainer.recv_rollout(timeout_s=120)
        start, got = time.perf_counter(), 1
        while got < n:
            got += len(trainer.recv_rollouts(1024, timeout_s=60))
        elapsed = time.perf_counter() - start
        trainer.shutdown_generators()
        proc.join(60)
    assert first.sample_id == "r0"
    msg_bytes = 8 * (prompt_len + response_len) + (4 + 8 + 1) * response_len  # ids, log-probs, versions, mask
    return (n - 1) / elapsed, msg_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the bf16 state dict in GiB")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (after one warm-up)")
    parser.add_argument("--rollouts", type=int, default=20000, help="rollouts per size in the message-rate test")
    parser.add_argument("--out", default="benchmarks/results/weight_sync_cpu.json")
    args = parser.parse_args()

    run = Provenance.start("weight_sync")
    sd = make_state_dict(args.gib)
    memcpy = Memcpy(sd)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    tcp_port = 47000 + os.getpid() % 1000 * 3

    def ipc():
        return f"ipc://{tempfile.mkdtemp(prefix='bws-')}/ep"

    cases = {
        "memcpy (in-process copy_)": lambda: bench_memcpy(memcpy, args.reps),
        "ipc+shm delivered": lambda: bench_transport(sd, memcpy, ipc(), True, False, args.reps),
        "ipc+shm applied": lambda: bench_transport(sd, memcpy, ipc(), True, True, args.reps),
        "ipc frames delivered": lambda: bench_transport(sd, memcpy, ipc(), False, False, args.reps),
        "tcp+curve frames delivered": lambda: bench_transport(sd, memcpy, f"tcp://127.0.0.1:{tcp_port}", False, False, args.reps),
        "tcp+curve frames applied": lambda: bench_transport(sd, memcpy, f"tcp://127.0.0.1:{tcp_port + 3}", False, True, args.reps),
        "pickle over ipc": lambda: bench_pickle(sd, memcpy, args.reps),
    }
    results = {}
    for name, case in cases.items():
        times, bars, cpus = case()
        med = statistics.median(times)
        ratios = [b / t for b, t in zip(bars, times)]
        results[name] = {"median_s": med, "best_s": min(times), "gb_per_s": nbytes / med / 1e9,
                         "best_gb_per_s": nbytes / min(times) / 1e9, "times_s": times,
                         "memcpy_times_s": bars, "fraction_of_memcpy": statistics.median(ratios),
                         "cpu_s": statistics.median(cpus), "gb_per_cpu_s": nbytes / statistics.median(cpus) / 1e9,
                         "cpu_times_s": cpus}
        print(f"  {name:28s} {nbytes / med / 1e9:7.2f} GB/s  (median {med * 1e3:8.1f} ms, "
              f"{statistics.median(ratios):5.0%} of the memcpy beside it)", flush=True)

    rollout_rates = []
    for prompt_len, response_len in [(128, 256), (512, 1024), (1024, 4096)]:
        rate, msg_bytes = bench_rollouts(prompt_len, response_len, args.rollouts)
        rollout_rates.append({"prompt_tokens": prompt_len, "response_tokens": response_len, "payload_bytes": msg_bytes,
                              "rollouts_per_s": rate, "mb_per_s": rate * msg_bytes / 1e6})

    print(f"\nweight sync, {nbytes / 2**30:.2f} GiB of bf16 in {len(sd)} tensors, trainer -> generator process")
    memcpy_cpu = results["memcpy (in-process copy_)"]["cpu_s"]
    for r in results.values():
        r["cpu_vs_memcpy"] = r["cpu_s"] / memcpy_cpu
    print(f"{'path':28s} {'GB/s':>8s} {'best GB/s':>10s} {'median ms':>10s} {'x memcpy':>9s} {'CPU s':>7s} {'CPU x memcpy':>13s}")
    for name, r in results.items():
        print(f"{name:28s} {r['gb_per_s']:8.2f} {r['best_gb_per_s']:10.2f} {r['median_s'] * 1e3:10.1f} "
              f"{r['fraction_of_memcpy']:9.0%} {r['cpu_s']:7.2f} {r['cpu_vs_memcpy']:13.2f}")
    print("\nrollouts, generator process -> trainer over ipc://")
    print(f"{'prompt+response tokens':24s} {'rollouts/s':>11s} {'MB/s':>8s}")
    for r in rollout_rates:
        print(f"{r['prompt_tokens']:>10d} + {r['response_tokens']:<11d} {r['rollouts_per_s']:11.0f} {r['mb_per_s']:8.1f}")

    report = {
        "torch_threads": torch.get_num_threads(), "libzmq": zmq.zmq_version(),
        "state_dict": {"bytes": nbytes, "tensors": len(sd), "dtype": "bfloat16"},
        "reps": args.reps,
        "weight_sync": results,
        "rollouts": rollout_rates,
        "notes": "delivered = until the generator holds the complete update and its ack is back; "
                 "applied = the generator also copies it into its own preallocated tensors. "
                 "Medians after one warm-up round (first round maps and faults in fresh pages). "
                 "fraction_of_memcpy = median over rounds of (memcpy time just before the round / round time), "
                 "because this machine is shared and its load moves between cases. "
                 "cpu_s = CPU seconds (all threads, trainer + generator process) per update: "
                 "a cost that does not depend on how loaded the machine is.",
    }
    run.write(args.out, report)


if __name__ == "__main__":
    main()
