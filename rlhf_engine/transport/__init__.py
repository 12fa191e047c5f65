"""ZeroMQ transport between the trainer and its generators: typed headers, raw tensor frames,
shared memory for same-host weights, no pickle. The wire format is documented in ``wire.py``."""

from rlhf_engine.data.samples import Sample
from rlhf_engine.transport.config import TransportConfig
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
from rlhf_engine.transport.keys import add_client_key, generate_keys, keys_main, load_keys
from rlhf_engine.transport.limits import rollout_memory_bound
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
