"""Rogue peers for the engine's chaos tests, run as scripts:

  python _rogue.py flood ENDPOINT POLICY_DIR SHM_DIR  handshake as a generator (right fingerprint), take
                                                     its weights, never sample, and push forged rollouts
                                                     until killed
  python _rogue.py hello ENDPOINT POLICY_DIR SHM_DIR  handshake, then stop (SIGSTOP): silent from then on
  python _rogue.py pull ENDPOINT                a bare PULL socket on the prompts endpoint that swallows batches
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import sys
import time

import torch
import zmq

from rlhf_engine.transport import BackpressureTimeout, GeneratorPort, Sample, TransportConfig
from rlhf_engine.transport.endpoints import channel_endpoint
from rlhf_engine.transport.weights import dir_fingerprint

VOCAB = 512  # the tiny test model's


def forged(i: int, prompt_id: int, **fields) -> Sample:
    base = dict(sample_id=f"forged-{i}", prompt_id=prompt_id, prompt_ids=[1, 2, 3],
                response_ids=[5, 6], behaviour_logp=[-0.5, -0.5], policy_versions=0, finish_reason="stop",
                generation_time=0.0)
    base.update(fields)
    return Sample(**base)


def kinds(i: int) -> list[Sample]:
    """One forged rollout of each kind; prompt ids 0..79 are those a 20-step run hands out."""
    pid = i % 80
    return [
        forged(i * 10 + 0, pid, response_ids=[5, VOCAB + 7], behaviour_logp=[-0.1, -0.1]),  # token out of range
        forged(i * 10 + 1, pid, response_ids=[5, -3], behaviour_logp=[-0.1, -0.1]),  # negative token
        forged(i * 10 + 2, 10**6 + i),  # a prompt this run never handed out
        forged(i * 10 + 3, pid, behaviour_logp=[-0.1, 0.7]),  # a positive log-prob
        forged(i * 10 + 4, pid, behaviour_logp=[-0.1, float("nan")]),
        forged(i * 10 + 5, pid, policy_versions=10**6),  # a policy from the future
        forged(i * 10 + 6, pid, response_ids=list(range(64)), behaviour_logp=[-0.1] * 64),  # oversized
    ]


def flood(endpoint: str, policy_dir: str, shm_dir: str) -> None:
    port = GeneratorPort(TransportConfig(endpoint=endpoint, shm_dir=shm_dir), dir_fingerprint(policy_dir), name="rogue")
    print("ready", port.sender_id, flush=True)
    for i in itertools.count():
        update = port.poll_weights()
        if update is not None:
            update.ack(False)
        batch = kinds(i)
        try:
            for r in batch + batch[:2]:  # the first two twice: duplicates
                port.send_rollout(r, timeout_s=0.1)
        except BackpressureTimeout:  # the trainer reads only while it waits for rollouts: ack weights meanwhile
            pass
        time.sleep(0.02)


def hello(endpoint: str, policy_dir: str, shm_dir: str) -> None:
    GeneratorPort(TransportConfig(endpoint=endpoint, shm_dir=shm_dir), dir_fingerprint(policy_dir), name="silent")
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


def pull(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.PULL)
    sock.connect(channel_endpoint(endpoint, "prompts"))
    print("ready", flush=True)
    while True:
        sock.recv_multipart()


LIFETIME_S = 600  # a rogue stops by itself at the latest after this long


def bound_lifetime() -> None:
    """Die with the test process (SIGKILL, also while stopped) and after LIFETIME_S at the latest."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    signal.alarm(LIFETIME_S)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    bound_lifetime()
    torch.set_num_threads(1)
    {"flood": flood, "hello": hello, "pull": pull}[mode](*args)
