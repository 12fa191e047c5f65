"""Sharded checkpoints in a single process (no process group): what they hold, and the errors for a folder
that is not one, a damaged one and one written for other models."""

import os
import shutil
import signal

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from rlhf_engine.common.checkpoint import CheckpointError, load_state
from rlhf_engine.distributed import Comm
from rlhf_engine.distributed.dcp import DCP_DIR, save_sharded
from rlhf_engine.trainer.ppo.checkpoint import check_checkpoint, load_trainer, save_trainer
from tests.distributed.workers.ppo_scenarios import make_trainer, run_steps


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A gae trainer after one step, saved in a single process (no process group)."""
    trainer = make_trainer(Comm(), "gae")
    run_steps(Comm(), trainer, "gae", range(1))
    path = tmp_path_factory.mktemp("layout") / "step-00000001"
    save_trainer(Comm(), path, trainer, {"step": 1})
    return trainer, path


def copy_of(path, tmp_path):
    return shutil.copytree(path, tmp_path / path.name)


def test_single_process_checkpoint_round_trips(saved):
    trainer, path = saved
    check_checkpoint(path)  # complete: no error
    assert [p.name for p in (path / "dcp").glob("*.distcp")] == ["__0_0.distcp"]
    fresh = make_trainer(Comm(), "gae")
    assert load_trainer(path, fresh) == {"step": 1}
    assert fresh.policy_version == trainer.policy_version == 1
    for (name, want), got in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(want, got), name
    want, got = trainer.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sorted(want) == sorted(got) and len(want) > 0
    for k in want:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(want[k][moment], got[k][moment]), (k, moment)
    assert fresh.lr_scheduler.state_dict() == trainer.lr_scheduler.state_dict()
    assert fresh.kl_ctl.state_dict() == trainer.kl_ctl.state_dict()


def test_a_folder_that_is_no_checkpoint_is_named_with_what_it_lacks(saved, tmp_path):
    ckpt = copy_of(saved[1], tmp_path)
    (ckpt / "state.json").unlink()
    (ckpt / "dcp" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=rf"^{ckpt} is not a complete rlhf-engine checkpoint: state.json, "
                                              r"dcp/.metadata missing"):
        load_trainer(ckpt, make_trainer(Comm(), "gae"))


@pytest.mark.parametrize("damage", ["truncated shard", "garbage metadata"])
def test_a_damaged_checkpoint_is_named(saved, tmp_path, damage):
    ckpt = copy_of(saved[1], tmp_path)
    target = ckpt / "dcp" / ("__0_0.distcp" if damage == "truncated shard" else ".metadata")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated shard" else b"not a pickle")
    with pytest.raises(CheckpointError, match=rf"^{ckpt}: cannot load the model and optimizer state in dcp/ .*"
                                              "the checkpoint is damaged or was written for other models"):
        load_trainer(ckpt, make_trainer(Comm(), "gae"))


def test_a_checkpoint_of_other_models_is_named(saved):
    # gae trains a policy with a value head; grpo's policy has none: other parameter names
    with pytest.raises(CheckpointError, match=rf"^{saved[1]}: cannot load the model and optimizer state in dcp/ "
                                              r"\(rank 0: RuntimeError: Missing key in checkpoint state_dict: "
                                              r"model.policy.model.embed_tokens.weight.\); .*written for other models"):
        load_trainer(saved[1], make_trainer(Comm(), "grpo"))


def test_ctrl_c_during_a_save_finishes_the_checkpoint_then_interrupts(tmp_path, monkeypatch, ctrl_c_raises):
    # a SIGINT in the middle of DCP's write: it is held until the checkpoint is complete, then raised (unheld,
    # torch's zip writer turned it into "RuntimeError: unexpected pos")
    write_data = FileSystemWriter.write_data

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return write_data(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(Comm(), tmp_path / "ckpt", {"policy": model}, torch.optim.SGD(model.parameters(), lr=0.1),
                     {"step": 3})
    assert (tmp_path / "ckpt" / DCP_DIR / ".metadata").is_file()
    assert load_state(tmp_path / "ckpt") == {"step": 3}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_raised_inside_a_save_comes_out_as_itself(tmp_path, monkeypatch):
    # DCP wraps a rank's exception in a CheckpointException (a BaseException): a KeyboardInterrupt raised in
    # the write (a second Ctrl-C) must stay one
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(Comm(), tmp_path / "ckpt", {"policy": model}, torch.optim.SGD(model.parameters(), lr=0.1), {})
    assert not (tmp_path / "ckpt").exists()  # and no partial checkpoint


def test_parameters_no_loss_reached_have_no_state_and_still_load(tmp_path):
    """A parameter without a gradient (a value head under GRPO) has no optimizer state when the checkpoint is
    written, while a fresh optimizer asks for one at load: it loads, with no state for it, the rest exact."""
    from rlhf_engine.distributed.dcp import load_sharded

    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 1)})
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = build()
    model["used"](torch.ones(4, 3)).sum().backward()
    optimizer.step()
    save_sharded(Comm(), tmp_path / "ckpt", {"policy": model}, optimizer, {})
    fresh, fresh_optimizer = build()
    load_sharded(tmp_path / "ckpt", {"policy": fresh}, fresh_optimizer)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert len(fresh_optimizer.state) == 2  # the used layer's weight and bias
    for p, q in zip(model["used"].parameters(), fresh["used"].parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh_optimizer.state[q][key]), key
    assert all(q not in fresh_optimizer.state for q in fresh["unused"].parameters())
