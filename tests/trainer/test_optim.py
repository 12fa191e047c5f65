"""The trainers' AdamW: fused on plain CPU tensors, with the same steps as torch's default implementation."""

import torch

from rlhf_engine.distributed.dcp import implementation_kept
from rlhf_engine.trainer.optim import adamw


def test_fused_on_cpu_and_equal_to_the_default_implementation():
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    params = {kind: [torch.nn.Parameter(t.clone()) for t in start] for kind in ("ours", "default")}
    ours = adamw(params["ours"], lr=1e-2, weight_decay=0.1)
    default = torch.optim.AdamW(params["default"], lr=1e-2, weight_decay=0.1)
    assert ours.defaults["fused"] is True and not default.defaults["fused"]
    for step in range(3):
        grads = [torch.randn_like(t) for t in start]
        for kind, opt in (("ours", ours), ("default", default)):
            for p, g in zip(params[kind], grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params["ours"], params["default"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (params["ours"][0] - start[0]).abs().max() > 1e-2  # the steps moved the weights


def test_param_groups_are_kept():
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    opt = adamw([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and opt.defaults["fused"] is True


def test_a_loaded_state_keeps_this_runs_implementation():
    w = torch.nn.Parameter(torch.ones(3))
    fused = adamw([w], lr=1e-3)
    w.grad = torch.ones(3)
    fused.step()
    default = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=5e-4)
    with implementation_kept(default):
        default.load_state_dict(fused.state_dict())
    assert not default.param_groups[0]["fused"]  # not the saving run's fused kernel
    assert default.param_groups[0]["lr"] == 1e-3  # the checkpoint's hyperparameters
    default.load_state_dict(fused.state_dict())  # what happens without it
    assert default.param_groups[0]["fused"] is True
