"""Handshake, heartbeats and shutdown between real processes."""

import multiprocessing as mp
import os
import time

import pytest
import torch
import zmq

from rlhf_engine.transport import (
    GeneratorPort,
    HandshakeError,
    PeerDeadError,
    ShutdownRequested,
    TrainerPort,
    model_fingerprint,
    state_dict_specs,
)
from rlhf_engine.transport.endpoints import Security
from rlhf_engine.transport.session import GeneratorControl
from rlhf_engine.transport.wire import PROTOCOL_VERSION
from tests.helpers.peers import FINGERPRINT, fast_config, idle_generator_main, ipc_endpoint, trainer_main
from tests.helpers.waiting import wait_until


def test_fingerprint_depends_on_names_shapes_dtypes_not_order():
    sd = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    fp = model_fingerprint(state_dict_specs(sd))
    assert fp == model_fingerprint(state_dict_specs(dict(reversed(list(sd.items())))))
    assert fp == model_fingerprint([("a", (2, 3), "float32"), ("b", [4], torch.bfloat16)])
    assert fp == model_fingerprint(sd) == model_fingerprint(list(sd.items()))
    assert fp != model_fingerprint(state_dict_specs({**sd, "a": torch.zeros(3, 2)}))
    assert fp != model_fingerprint(state_dict_specs({**sd, "b": torch.zeros(4)}))
    assert fp != model_fingerprint(state_dict_specs({"c": sd["a"], "b": sd["b"]}))


def test_protocol_version_mismatch_is_a_clear_error_on_both_sides():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer:
        ctx = zmq.Context()
        try:
            with pytest.raises(HandshakeError, match=f"protocol version mismatch.*v{PROTOCOL_VERSION + 1}.*v{PROTOCOL_VERSION}"):
                GeneratorControl(ctx, config, FINGERPRINT, "old-gen", Security(config, server=False, context=ctx),
                                 protocol_version=PROTOCOL_VERSION + 1)
        finally:
            ctx.term()
        with pytest.raises(HandshakeError, match="protocol version mismatch: generator 'old-gen'"):
            trainer.wait_for_generators(1, timeout_s=1)


def test_model_fingerprint_mismatch_is_a_clear_error_on_both_sides():
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT) as trainer:
        with pytest.raises(HandshakeError, match="model fingerprint mismatch"):
            GeneratorPort(config, "0" * 64)
        with pytest.raises(HandshakeError, match="model fingerprint mismatch"):
            trainer.wait_for_generators(1, timeout_s=1)
        assert trainer.generators() == []


def test_no_trainer_means_a_handshake_timeout_not_a_hang():
    config = fast_config(ipc_endpoint(), handshake_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="no handshake answer from the trainer"):
        GeneratorPort(config, FINGERPRINT)
    assert time.monotonic() - start < 3


def test_killed_trainer_becomes_peer_dead_error_in_the_generator(tmp_path):
    config = fast_config(ipc_endpoint(), heartbeat_timeout_s=1.0)
    ready = str(tmp_path / "ready")
    proc = mp.get_context("spawn").Process(target=trainer_main, args=(config, ready))
    proc.start()
    try:
        wait_until(lambda: os.path.exists(ready), 60, message="the trainer process ready")
        with GeneratorPort(config, FINGERPRINT) as gen:
            assert gen.recv_prompts(timeout_s=0.3) is None  # alive: just nothing to do
            proc.kill()
            start = time.monotonic()
            with pytest.raises(PeerDeadError, match="sent nothing for"):
                while True:
                    gen.recv_prompts(timeout_s=0.2)
            assert time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.join()


def test_killed_generator_leaves_the_roster_without_an_error_and_is_reported_once():
    config = fast_config(ipc_endpoint(), heartbeat_timeout_s=1.0)
    with TrainerPort(config, FINGERPRINT) as trainer:
        proc = mp.get_context("spawn").Process(target=idle_generator_main, args=(config,))
        proc.start()
        try:
            (info,) = trainer.wait_for_generators(1, timeout_s=60)
            proc.kill()
            lost = wait_until(trainer.pop_lost_generators, 5, message="the killed generator lost")
            assert [(g.name, g.state) for g in lost] == [(info.name, "lost")]
            assert trainer.generators() == [] and trainer.pop_lost_generators() == []
            trainer.raise_if_dead()  # a lost generator is not the port's failure
            with GeneratorPort(config, FINGERPRINT) as again:  # anyone may (re)join at any time
                (back,) = trainer.wait_for_generators(1, timeout_s=10)
                assert back.name == again.sender_id != info.name
        finally:
            proc.kill()
            proc.join()


def test_orderly_shutdown_reaches_the_generator_and_its_goodbye_reaches_the_trainer():
    config = fast_config(ipc_endpoint())
    trainer = TrainerPort(config, FINGERPRINT)
    gen = GeneratorPort(config, FINGERPRINT)
    (info,) = trainer.wait_for_generators(1)
    trainer.shutdown_generators("done training")
    with pytest.raises(ShutdownRequested, match="done training"):
        gen.recv_prompts(timeout_s=5)
    gen.close()
    wait_until(lambda: trainer.generators() == [], 5, message="the generator gone from the roster")
    assert [(g.name, g.state) for g in trainer.pop_lost_generators()] == [(info.name, "left")]
    start = time.monotonic()
    trainer.close()
    assert time.monotonic() - start < 1.0
