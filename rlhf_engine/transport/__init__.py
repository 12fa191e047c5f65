"""ZeroMQ transport between the trainer and its generators: typed headers, raw tensor frames,
shared memory for same-host weights, no pickle. The wire format is documented in ``wire.py``.

One module per concern:

- ``config.py``: ``TransportConfig`` (the ``transport:`` section) and the per-channel size limits derived from it
- ``wire.py``: the wire format: headers, frames, validation before a byte is trusted
- ``messages.py``: the records exchanged (``Sample``, ``PromptBatch``, ``WeightUpdate``) and their wire headers
- ``errors.py``: the typed errors the transport raises to its users
- ``endpoints.py``: endpoint names, CURVE keys (``rlhf-engine keys``), the ZAP allow-list, the private ipc directory
- ``iothread.py``: the IO threads that own one socket each (the control loop among them), drop counting
- ``channel.py``: one-way channels with back-pressure: prompt batches to generators, rollouts to the trainer
- ``session.py``: handshake, heartbeats, goodbye on the control channel
- ``roster.py``: which generators joined, are live or were lost
- ``weights.py``: weight sync: what a version carries, its specs, fingerprint and checks, the one accessor
- ``distribution.py``: weight updates over the control channel: publish and acks (trainer), receive (generator)
- ``relay.py``: the relay seam: one copy of an update per host, through one generator's shared memory
- ``shm.py``: the shared-memory buffers and files
- ``ports.py``: ``TrainerPort`` and ``GeneratorPort``, each end as one object
"""

from rlhf_engine.data.samples import Sample
from rlhf_engine.transport.config import TransportConfig, rollout_memory_bound
from rlhf_engine.transport.endpoints import add_client_key, generate_keys, keys_main, load_keys
from rlhf_engine.transport.errors import (
    AuthenticationFailed,
    BackpressureTimeout,
    EndpointInUseError,
    HandshakeError,
    HandshakeTimeout,
    InsecureEndpointError,
    PeerDeadError,
    ShutdownRequested,
    TransportClosed,
    TransportError,
)
from rlhf_engine.transport.messages import PromptBatch, WeightUpdate
from rlhf_engine.transport.ports import GeneratorPort, TrainerPort
from rlhf_engine.transport.roster import GeneratorInfo
from rlhf_engine.transport.weights import model_fingerprint, state_dict_specs
from rlhf_engine.transport.wire import PROTOCOL_VERSION, WireLimits

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationFailed",
    "BackpressureTimeout",
    "EndpointInUseError",
    "GeneratorInfo",
    "GeneratorPort",
    "HandshakeError",
    "HandshakeTimeout",
    "InsecureEndpointError",
    "PeerDeadError",
    "PromptBatch",
    "Sample",
    "ShutdownRequested",
    "TrainerPort",
    "TransportClosed",
    "TransportConfig",
    "TransportError",
    "WeightUpdate",
    "WireLimits",
    "add_client_key",
    "generate_keys",
    "keys_main",
    "load_keys",
    "model_fingerprint",
    "rollout_memory_bound",
    "state_dict_specs",
]
