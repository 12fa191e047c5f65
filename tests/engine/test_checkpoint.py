"""The format-independent pieces of checkpoints: atomic folders, the pickle-free state files, pruning, RNG."""

import os
import random
import signal
import threading

import numpy as np
import pytest
import torch

from rlhf_engine.common.checkpoint import (
    CheckpointError,
    atomic_directory,
    checkpoint_path,
    flatten_state,
    interrupts_held,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    unflatten_state,
    write_state,
)


def save(run_dir, step, state, folders=None):
    path = checkpoint_path(run_dir, step)
    with atomic_directory(path) as tmp:
        for name, write in (folders or {}).items():
            write(tmp / name)
        write_state(tmp, state)
    return path


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "version": 3, "pair": (1, "a")}
    path = save(tmp_path, 3, state)
    back = load_state(path)
    assert back["version"] == 3 and back["pair"] == (1, "a")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(back["optimizer"])
    for k in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state_dict()["state"][k][name], opt.state_dict()["state"][k][name])


def test_flatten_rejects_unknown_objects():
    with pytest.raises(TypeError, match=r"cannot checkpoint a object at a.b"):
        flatten_state({"a": {"b": object()}})


def test_int_keys_stay_ints():
    tree, tensors = flatten_state({0: torch.ones(2), "x": [1, 2]})
    back = unflatten_state(tree, tensors)
    assert list(back) == [0, "x"] and torch.equal(back[0], torch.ones(2))


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    first = save(tmp_path, 1, {"a": 1})

    def broken(path):
        path.mkdir()
        (path / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save(tmp_path, 2, {"a": 2}, folders={"policy": broken})
    assert list_checkpoints(tmp_path) == [first]
    assert latest_checkpoint(tmp_path) == first
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp")]


def test_keep_last_prunes_old(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, {"s": step})
        prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    with pytest.raises(ValueError, match=r"keep_last \(0\) must be >= 1"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_damaged_state_files_are_named(tmp_path):
    path = save(tmp_path, 1, {"t": torch.ones(3)})
    (path / "state.json").write_text('{"__items__": [["t", {"__tensor__"')
    with pytest.raises(CheckpointError, match=rf"^{path}: its state.json / state.safetensors cannot be read "
                                              r"\(JSONDecodeError: .*\); the checkpoint is damaged"):
        load_state(path)


def test_atomic_directory_replaces_existing(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"


def test_rng_state_restores_all_generators():
    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    tree, tensors = flatten_state(state)
    set_rng_state(unflatten_state(tree, tensors))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_ctrl_c_is_held_until_the_block_ends_then_delivered(ctrl_c_raises):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the write")
    assert done == ["rest of the write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_is_held_and_goes_to_the_handler_in_place():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_interrupts_at_once(ctrl_c_raises):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_block_without_a_signal_changes_nothing(ctrl_c_raises):
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_held(ctrl_c_raises):
    seen = []

    def body():
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
