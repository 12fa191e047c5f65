"""Loopback by default; CURVE required (and working) for anything else."""

import logging
import os
import stat

import pytest
import zmq

from tests.helpers.peers import FINGERPRINT, fast_config, tcp_endpoint
from rlhf_engine.transport import (
    GeneratorPort,
    HandshakeError,
    InsecureEndpointError,
    Rollout,
    TrainerPort,
    generate_keys,
    keys_main,
)
from rlhf_engine.transport.endpoints import channel_endpoint, is_loopback


@pytest.mark.parametrize("endpoint, local", [
    ("ipc:///tmp/x", True), ("tcp://127.0.0.1:5000", True), ("tcp://127.3.2.1:5000", True),
    ("tcp://localhost:5000", True), ("tcp://[::1]:5000", True), ("tcp://0.0.0.0:5000", False),
    ("tcp://*:5000", False), ("tcp://10.1.2.3:5000", False), ("tcp://eth0:5000", False),
])
def test_is_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


def test_channel_endpoints_are_derived_from_the_base():
    assert channel_endpoint("tcp://10.0.0.1:7000", "rollouts") == "tcp://10.0.0.1:7001"
    assert channel_endpoint("ipc:///run/x", "prompts") == "ipc:///run/x.prompts"


def test_curve_is_available():
    assert zmq.has("curve")


def test_non_loopback_without_keys_is_refused_unless_explicitly_insecure(caplog):
    port = tcp_endpoint().rsplit(":", 1)[1]
    with pytest.raises(InsecureEndpointError, match="not loopback.*rlhf-engine keys"):
        TrainerPort(fast_config(f"tcp://0.0.0.0:{port}"), FINGERPRINT)
    with pytest.raises(InsecureEndpointError):
        GeneratorPort(fast_config(f"tcp://10.255.255.1:{port}"), FINGERPRINT)
    with caplog.at_level(logging.WARNING):
        with TrainerPort(fast_config(f"tcp://0.0.0.0:{port}", allow_insecure=True), FINGERPRINT):
            pass
    assert "WITHOUT encryption or authentication" in caplog.text


def test_keys_main_writes_keypairs_with_private_secrets(tmp_path, capsys):
    assert keys_main([str(tmp_path / "keys")]) == 0
    names = sorted(os.listdir(tmp_path / "keys"))
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for name in ("client.key_secret", "server.key_secret"):
        assert stat.S_IMODE(os.stat(tmp_path / "keys" / name).st_mode) == 0o600
    with pytest.raises(FileExistsError, match="--force"):
        keys_main([str(tmp_path / "keys")])
    assert "curve_keys_dir" in capsys.readouterr().out


def test_curve_connects_with_the_keys_and_refuses_without_or_with_other_keys(tmp_path):
    generate_keys(tmp_path / "keys")
    generate_keys(tmp_path / "other")
    endpoint = tcp_endpoint()
    config = fast_config(endpoint, curve_keys_dir=str(tmp_path / "keys"), handshake_timeout_s=1.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        with GeneratorPort(config, FINGERPRINT) as gen:
            trainer.wait_for_generators(1)
            gen.send_rollout(Rollout("r0", 0, [1], [2, 3], [-1.0, -2.0], 0, "stop", 0.0))
            assert trainer.recv_rollout(timeout_s=5).rollout_id == "r0"
        with pytest.raises(HandshakeError, match="no handshake answer"):
            GeneratorPort(fast_config(endpoint, handshake_timeout_s=1.0), FINGERPRINT)  # plain text
        with pytest.raises(HandshakeError, match="no handshake answer"):
            GeneratorPort(fast_config(endpoint, curve_keys_dir=str(tmp_path / "other"), handshake_timeout_s=1.0),
                          FINGERPRINT)
