"""ZeroMQ transport between the trainer and its generators: typed headers, raw tensor frames,
shared memory for same-host weights, no pickle. The wire format is documented in ``wire.py``."""

from rlhf_engine.transport.config import TransportConfig
from rlhf_engine.transport.control import GeneratorInfo
from rlhf_engine.transport.errors import (
    BackpressureTimeout,
    HandshakeError,
    HandshakeTimeout,
    InsecureEndpointError,
    PeerDeadError,
    ShutdownRequested,
    TransportClosed,
    TransportError,
)
from rlhf_engine.transport.keys import generate_keys, keys_main, load_keys
from rlhf_engine.transport.messages import PromptBatch, Rollout, WeightUpdate
from rlhf_engine.transport.ports import GeneratorPort, TrainerPort
from rlhf_engine.transport.weights import model_fingerprint, state_dict_specs
from rlhf_engine.transport.wire import PROTOCOL_VERSION, WireLimits

__all__ = [
    "PROTOCOL_VERSION",
    "BackpressureTimeout",
    "GeneratorInfo",
    "GeneratorPort",
    "HandshakeError",
    "HandshakeTimeout",
    "InsecureEndpointError",
    "PeerDeadError",
    "PromptBatch",
    "Rollout",
    "ShutdownRequested",
    "TrainerPort",
    "TransportClosed",
    "TransportConfig",
    "TransportError",
    "WeightUpdate",
    "WireLimits",
    "generate_keys",
    "keys_main",
    "load_keys",
    "model_fingerprint",
    "state_dict_specs",
]
