"""Only our peers talk to us: CURVE on every tcp endpoint, a ZAP allow-list of client keys,
an authenticated sender on every rollout, and a clear error for a refused key."""

import logging
import os
import stat

import pytest
import torch
import zmq

from rlhf_engine.transport import (
    AuthenticationFailed,
    GeneratorPort,
    HandshakeError,
    InsecureEndpointError,
    PromptBatch,
    Sample,
    TrainerPort,
    add_client_key,
    generate_keys,
    keys_main,
    state_dict_specs,
)
from tests.helpers.peers import FINGERPRINT, fast_config, handshake_event, make_rollout, raw_peer, tcp_endpoint
from tests.helpers.waiting import wait_until


def test_curve_is_available():
    assert zmq.has("curve")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_tcp_without_keys_is_refused_loopback_included_unless_explicitly_insecure(host, caplog):
    port = tcp_endpoint().rsplit(":", 1)[1]
    with pytest.raises(InsecureEndpointError, match="tcp without CURVE keys.*rlhf-engine keys"):
        TrainerPort(fast_config(f"tcp://{host}:{port}", allow_insecure=False), FINGERPRINT)
    with pytest.raises(InsecureEndpointError):
        GeneratorPort(fast_config(f"tcp://{host}:{port}", allow_insecure=False), FINGERPRINT)
    with caplog.at_level(logging.WARNING):
        with TrainerPort(fast_config(f"tcp://{host}:{port}", allow_insecure=True), FINGERPRINT):
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
    assert keys_main([str(tmp_path / "keys"), "--client", "gen-7"]) == 0
    public, secret = tmp_path / "keys" / "clients" / "gen-7.key", tmp_path / "keys" / "clients" / "gen-7.key_secret"
    assert f"curve_client_key={secret}" in capsys.readouterr().out
    assert public.exists()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    with pytest.raises(ValueError, match="letters, digits"):
        add_client_key(tmp_path / "keys", "../evil")


def test_curve_connects_with_the_keys_and_refuses_without_or_with_other_keys(tmp_path):
    generate_keys(tmp_path / "keys")
    generate_keys(tmp_path / "other")
    endpoint = tcp_endpoint()
    config = fast_config(endpoint, curve_keys_dir=str(tmp_path / "keys"), handshake_timeout_s=1.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        with GeneratorPort(config, FINGERPRINT) as gen:
            trainer.wait_for_generators(1)
            gen.send_rollout(Sample("r0", 0, [1], [2, 3], [-1.0, -2.0], 0, "stop"))
            got = trainer.recv_rollout(timeout_s=5)
            assert (got.sample_id, got.sender) == ("r0", gen.sender_id)
        with pytest.raises(HandshakeError, match="no handshake answer"):
            GeneratorPort(fast_config(endpoint, handshake_timeout_s=1.0, allow_insecure=True), FINGERPRINT)
        with pytest.raises(HandshakeError, match="no handshake answer"):  # another server key: ZeroMQ says nothing
            GeneratorPort(fast_config(endpoint, curve_keys_dir=str(tmp_path / "other"), handshake_timeout_s=1.0),
                          FINGERPRINT)


def test_weights_of_exactly_the_model_specs_pass_curve(tmp_path):
    """The socket's frame limit is the largest tensor: CURVE's per-frame overhead must still fit."""
    generate_keys(tmp_path / "keys")
    sd = {"big": torch.randn(1 << 16), "small": torch.randn(3).bfloat16()}
    config = fast_config(tcp_endpoint(), curve_keys_dir=str(tmp_path / "keys"))
    with TrainerPort(config, FINGERPRINT, weight_specs=state_dict_specs(sd)) as trainer, \
            GeneratorPort(config, FINGERPRINT, weight_specs=state_dict_specs(sd)) as gen:
        trainer.wait_for_generators(1)
        trainer.publish_weights(1, sd)
        update = gen.wait_weights(1, timeout_s=10)
        assert all(torch.equal(update.tensors[k], v) for k, v in sd.items())
        update.ack()
        assert trainer.wait_for_acks(1, timeout_s=10) == {gen.sender_id: True}


def test_a_client_key_not_in_the_trainers_folder_fails_with_authentication_failed(tmp_path):
    generate_keys(tmp_path / "keys")
    _, stranger = add_client_key(tmp_path / "elsewhere", "stranger")  # right server key, unknown client key
    for name in ("server.key",):
        (tmp_path / "elsewhere" / name).write_bytes((tmp_path / "keys" / name).read_bytes())
    config = fast_config(tcp_endpoint(), curve_keys_dir=str(tmp_path / "keys"), handshake_timeout_s=10.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        rogue = fast_config(config.endpoint, curve_keys_dir=str(tmp_path / "elsewhere"), curve_client_key=str(stranger),
                            handshake_timeout_s=10.0)
        with pytest.raises(AuthenticationFailed, match="authentication failed.*keys folder"):
            GeneratorPort(rogue, FINGERPRINT)
        assert trainer.generators() == []
        wait_until(lambda: trainer.drop_counts().get("auth_failed"), 5, message="auth_failed counted by the trainer")
        # the same key, once in the trainer's folder, is accepted (the allow-list is read at start)
    _, own = add_client_key(tmp_path / "keys", "gen-b")
    with TrainerPort(config, FINGERPRINT) as trainer:
        with GeneratorPort(fast_config(config.endpoint, curve_keys_dir=str(tmp_path / "keys"),
                                       curve_client_key=str(own)), FINGERPRINT):
            assert len(trainer.wait_for_generators(1)) == 1


def test_a_rollout_claiming_another_generators_name_is_dropped_and_counted(tmp_path):
    generate_keys(tmp_path / "keys")
    _, key_b = add_client_key(tmp_path / "keys", "b")
    config = fast_config(tcp_endpoint(), curve_keys_dir=str(tmp_path / "keys"))
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT, name="a") as gen_a, \
            GeneratorPort(fast_config(config.endpoint, curve_keys_dir=str(tmp_path / "keys"), curve_client_key=str(key_b)),
                          FINGERPRINT, name="b") as gen_b:
        trainer.wait_for_generators(2)
        gen_b._rollouts._sender_id = gen_a.sender_id  # b's connection (b's key) claims to be a
        gen_b.send_rollout(make_rollout(0, 0, 4, 4))
        gen_b._rollouts._sender_id = gen_b.sender_id
        gen_b.send_rollout(make_rollout(0, 2, 4, 4))  # after the forged one on b's connection: it was handled first
        gen_a.send_rollout(make_rollout(0, 1, 4, 4))
        got = sorted((r.sample_id, r.sender) for r in [trainer.recv_rollout(timeout_s=5) for _ in range(2)])
        assert got == [("g0-1", gen_a.sender_id), ("g0-2", gen_b.sender_id)]
        assert trainer.recv_rollout(timeout_s=0) is None
        assert trainer.drop_counts() == {"forged_sender": 1}


def test_with_curve_a_rogue_pull_without_keys_gets_no_batch(tmp_path):
    generate_keys(tmp_path / "keys")
    config = fast_config(tcp_endpoint(), curve_keys_dir=str(tmp_path / "keys"))
    with TrainerPort(config, FINGERPRINT) as trainer:
        with raw_peer(config.endpoint, zmq.PULL, "prompts") as thief:
            assert handshake_event(thief) != zmq.EVENT_HANDSHAKE_SUCCEEDED  # it reached the trainer, which refused it
            with GeneratorPort(config, FINGERPRINT) as gen:
                trainer.wait_for_generators(1)
                for b in range(3):  # round-robin over the peers the socket took: only the generator
                    trainer.send_prompts(PromptBatch(b, [b], [[b]]), timeout_s=5)
                    assert gen.recv_prompts(timeout_s=5).batch_id == b
            assert not thief.poll(0)


def test_cli_keys_forwards_client_and_force(tmp_path, capsys):
    from rlhf_engine.cli import main

    assert main(["keys", str(tmp_path / "keys")]) == 0
    assert main(["keys", str(tmp_path / "keys"), "--client", "gen-1"]) == 0
    assert (tmp_path / "keys" / "clients" / "gen-1.key").exists()
    before = (tmp_path / "keys" / "server.key").read_bytes()
    assert main(["keys", str(tmp_path / "keys"), "--force"]) == 0
    assert (tmp_path / "keys" / "server.key").read_bytes() != before  # a new server keypair
