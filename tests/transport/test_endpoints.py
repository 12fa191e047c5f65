"""Endpoints and the files of a run: channel endpoints derived from one base, a private ipc folder by default,
one live run per endpoint, files of dead runs swept at start (never a live run's), staging files named for their
owner and removed when closed."""

import os
import shutil
import stat
import time

import pytest
import torch
import zmq

from rlhf_engine.rollout.staging import StagingFile
from rlhf_engine.transport import EndpointInUseError, GeneratorPort, TrainerPort
from rlhf_engine.transport.endpoints import channel_endpoint
from tests.helpers.peers import FINGERPRINT, fast_config, hold_endpoint_main, ipc_endpoint, short_dir, spawn
from tests.helpers.waiting import wait_until


def _dead_pid() -> int:
    proc = spawn(time.sleep, 0)
    proc.join()
    return proc.pid


def test_channel_endpoints_are_derived_from_the_base():
    assert channel_endpoint("tcp://10.0.0.1:7000", "rollouts") == "tcp://10.0.0.1:7001"
    assert channel_endpoint("ipc:///run/x", "prompts") == "ipc:///run/x.prompts"


def test_ipc_socket_paths_past_the_unix_limit_are_refused_with_the_field():
    """A Unix socket path holds at most 107 characters: an endpoint or ipc_dir whose sockets would pass it is a
    config error, not a bind that fails once the run has started; a path at the limit binds."""
    from rlhf_engine.transport.config import IPC_PATH_MAX, TransportConfig

    # the longest channel is `.rollouts`: a base endpoint whose `.rollouts` socket has exactly the limit binds ...
    base = short_dir()
    fits = f"{base}/" + "e" * (IPC_PATH_MAX - len(".rollouts") - len(base) - 1)
    with TrainerPort(fast_config(f"ipc://{fits}"), FINGERPRINT) as port:
        assert len(port.endpoint) - len("ipc://") + len(".rollouts") == IPC_PATH_MAX
    # ... one character more is a config error naming the field, and the kernel would refuse it too
    with pytest.raises(ValueError, match=rf"transport.endpoint .* up to {IPC_PATH_MAX + 1} characters, a Unix "
                                         rf"socket takes {IPC_PATH_MAX}"):
        TransportConfig(endpoint=f"ipc://{fits}e")
    context = zmq.Context()
    with context.socket(zmq.PULL) as sock, pytest.raises(zmq.ZMQError, match="longer than 107"):
        sock.bind(f"ipc://{fits}e.rollouts")
    context.term()
    shutil.rmtree(base)
    # the private directory's socket: <ipc_dir>/rlhf-engine-XXXXXXXX/engine.rollouts
    room = IPC_PATH_MAX - len("/rlhf-engine-12345678/engine.rollouts")
    TransportConfig(ipc_dir="/" + "d" * (room - 1))
    with pytest.raises(ValueError, match=rf"transport.ipc_dir .* up to {IPC_PATH_MAX + 1} characters"):
        TransportConfig(ipc_dir="/" + "d" * room)
    TransportConfig(endpoint="tcp://127.0.0.1:7000", ipc_dir="/" + "d" * 200)  # no ipc socket: not checked


def test_the_default_endpoint_is_a_fresh_private_directory_removed_on_close():
    ipc_dir = short_dir()
    config = fast_config(ipc_endpoint())
    config.endpoint = None
    config.ipc_dir = ipc_dir
    with TrainerPort(config, FINGERPRINT) as a, TrainerPort(config, FINGERPRINT) as b:
        assert a.endpoint != b.endpoint
        folder = os.path.dirname(a.endpoint[len("ipc://"):])
        assert os.path.dirname(folder) == ipc_dir
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        with GeneratorPort(fast_config(a.endpoint), FINGERPRINT):
            assert len(a.wait_for_generators(1)) == 1
    assert os.listdir(ipc_dir) == []
    os.rmdir(ipc_dir)
    with pytest.raises(ValueError, match="needs the trainer's endpoint"):
        GeneratorPort(config, FINGERPRINT)


def test_a_second_run_on_the_endpoint_of_a_live_run_is_refused_and_a_dead_runs_is_taken(tmp_path):
    config = fast_config(f"ipc://{tmp_path}/ep")
    ready = tmp_path / "ready"
    owner = spawn(hold_endpoint_main, config, str(ready))
    try:
        wait_until(lambda: ready.exists() and ready.read_text(), 60, message="the endpoint's owner ready")
        with pytest.raises(EndpointInUseError, match=f"held by a live run \\(pid {owner.pid}"):
            TrainerPort(config, FINGERPRINT)
        with GeneratorPort(config, FINGERPRINT):  # the live run still serves its generators
            pass
        owner.kill()
        owner.join()
        with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT):
            assert len(trainer.wait_for_generators(1)) == 1
    finally:
        owner.kill()
        owner.join()


def test_starting_removes_stale_files_of_dead_runs_never_of_live_ones(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    ns = os.stat("/proc/self/ns/pid").st_ino  # names carry the owner's pid namespace
    stale = [tmp_path / f"rlhf-engine-{dead}.{ns}-weights-ab", tmp_path / f"rlhf-engine-{dead}.{ns}-staging-cd"]
    kept = [tmp_path / f"rlhf-engine-{live}.{ns}-staging-ef", tmp_path / "unrelated",
            tmp_path / f"rlhf-engine-{dead}.{ns + 1}-relay-ij",  # another pid namespace: its pids mean nothing here
            tmp_path / f"rlhf-engine-{dead}-weights-kl"]  # no namespace in the name: not swept either
    for path in stale + kept:
        path.write_bytes(b"x")
    adapters = tmp_path / f"rlhf-engine-{dead}.{ns}-adapters-gh"  # a killed vLLM generator's adapter folder
    (adapters / "policy-v3").mkdir(parents=True)
    (adapters / "policy-v3" / "adapter_model.safetensors").write_bytes(b"x")
    with TrainerPort(fast_config(ipc_endpoint(), shm_dir=str(tmp_path)), FINGERPRINT):
        assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept)


def test_a_staging_file_is_named_for_its_owner_and_removed_when_it_closes(tmp_path):
    staging = StagingFile({"w": (4, 4)}, torch.float32, directory=str(tmp_path))
    (name,) = os.listdir(tmp_path)
    assert name.startswith(f"rlhf-engine-{os.getpid()}.{os.stat('/proc/self/ns/pid').st_ino}-staging-")
    assert stat.S_IMODE(os.stat(staging.path).st_mode) == 0o600
    staging.close()
    assert os.listdir(tmp_path) == []
