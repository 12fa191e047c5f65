"""`run_generator`: the body of a generator process (`rlhf-engine generator`, or a child of the engine).

Builds the backend first (vLLM takes tens of seconds to start), then connects to the trainer:
the handshake means "ready to serve". Runs `GeneratorLoop` (`ContinuousLoop` with `max_inflight`) until the trainer asks to stop
(returns), goes silent (`PeerDeadError`, re-raised after cleanup) or SIGTERM arrives (for
example from the kernel when the parent dies: `procs.start_child` sets PR_SET_PDEATHSIG);
in every case the backend is closed, so no vLLM engine process outlives this one.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

from rlhf_engine.common.heap import settle
from rlhf_engine.rollout.backends import make_generator
from rlhf_engine.rollout.config import GeneratorConfig
from rlhf_engine.rollout.continuous import ContinuousLoop
from rlhf_engine.rollout.loop import GeneratorLoop, LoopStats
from rlhf_engine.transport import GeneratorPort, ShutdownRequested, TransportConfig
from rlhf_engine.transport.weights import sync_fingerprint

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """SIGTERM arrived: unwinds the generator process through its cleanup."""


@contextlib.contextmanager
def sigterm_as_exit():
    """In the main thread, turn SIGTERM into `Terminated` (so `finally` blocks run) for the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_generator(
    config: GeneratorConfig, transport: TransportConfig, *, name: str = "generator", max_staleness: int = 1,
    weights: str | Path | None = None, weights_version: int = 0,
) -> LoopStats:
    """Serve the trainer at `transport.endpoint` with a generator built from `config` until it
    says stop; returns what the loop did. Raises `PeerDeadError` when the trainer goes silent and
    `HandshakeError` when it refuses us (model fingerprint or protocol mismatch).

    weights: a safetensors file of policy `weights_version` (HF names; with `config.lora` the adapters)
    applied before connecting: a replacement generator starts from the trainer's newest weights, not the
    policy folder's. Every update must carry exactly the generator's `expected` tensors (the port checks
    names, shapes and dtypes before anything is applied).
    """
    fingerprint = sync_fingerprint(config.model, config.lora)
    with sigterm_as_exit():
        generator = make_generator(config)
        settle()  # the process's start is over (where its program paused the collector)
        try:
            if weights is not None:
                from safetensors.torch import load_file

                if not generator.update_weights(weights_version, load_file(str(weights))):
                    raise ValueError(f"{weights}: version {weights_version} is not newer than the generator's "
                                     f"v{generator.version}")
                log.info("%s: started from weights v%d of %s", name, weights_version, weights)
            with GeneratorPort(transport, fingerprint, name=name, weight_specs=generator.weight_specs) as port:
                log.info("%s connected to %s with %s (weights v%d)", port.sender_id, transport.endpoint,
                         type(generator).__name__, generator.version)
                loop_class = ContinuousLoop if config.max_inflight else GeneratorLoop
                loop = loop_class(generator, port, max_staleness=max_staleness,
                                  max_prompt_tokens=transport.max_prompt_tokens)
                try:
                    loop.run()
                except ShutdownRequested as e:
                    log.info("%s: %s", port.sender_id, e)
                finally:
                    port.flush(timeout_s=2.0)
                    log.info("%s stats: %s", port.sender_id, loop.summary())
                return loop.stats
        finally:
            generator.close()
