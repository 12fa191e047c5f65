"""Comm, the batch broadcast, FSDP2 sharding and gather, DCP save at 2 ranks / load at 1 (gloo, CPU)."""

import json

import pytest
import torch

from rlhf_engine.distributed import Comm
from rlhf_engine.distributed.dcp import load_sharded
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from tests.distributed.conftest import run_group, torchrun_cmd


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("basics")
    proc = run_group(torchrun_cmd(2, "basics.py", str(out)), timeout=150)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_batch_broadcast_and_collectives(two_rank_run):
    _, ranks = two_rank_run
    for r, seen in enumerate(ranks):
        assert seen["batch_equal"] is True
        assert seen["none_fields"] == [True, True, True]  # absent fields stay absent
        assert seen["sum"] == [1.0 + 2.0, 20.0]
        assert seen["x_unchanged"] == [r + 1.0, 10.0]
        assert seen["gathered"] == [0.0, 0.0, 1.0, 1.0]  # rank order
        assert seen["agree_rank1_only"] is True  # one rank's flag decides for all
        assert seen["agree_none"] is False
        assert seen["str"] == "from rank 0 ✓"
        assert seen["shard"] == [4 * r, 4 * r + 4]


def test_fsdp_shards_start_from_rank0_and_gather_whole(two_rank_run):
    _, ranks = two_rank_run
    for seen in ranks:
        assert seen["gather_names_equal"] is True
        assert seen["gather_max_diff"] == 0.0  # rank 1 built other weights; rank 0's were broadcast
    # each rank holds about half of the parameters (dim-0 shards of odd sizes differ by a row)
    assert sum(s["local_numel"] for s in ranks) == ranks[0]["full_numel"]
    assert abs(ranks[0]["local_numel"] - ranks[1]["local_numel"]) < 0.01 * ranks[0]["full_numel"]


def test_dcp_saved_at_two_ranks_loads_at_one(two_rank_run):
    out, _ = two_rank_run
    ckpt = out / "ckpt"
    assert not list(out.glob(".tmp-*"))  # the temporary directory was renamed away
    want = torch.load(out / "full_after_step.pt")
    tokenizer = build_tokenizer(300)
    spec = TinyLlamaSpec(vocab_size=300, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
    model = AutoModelForCausalLMWithValueHead(build_llama(spec, tokenizer, seed=5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = load_sharded(ckpt, {"policy": model}, optimizer)
    assert extra["marker"] == 7 and torch.equal(extra["t"], torch.arange(3))
    got = {f"policy.{k}": v for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) == 0.0
    # the optimizer moments came back too: one AdamW step taken, moments non-zero
    states = list(optimizer.state.values())
    assert len(states) == len(list(model.parameters()))
    assert all(float(s["step"]) == 1.0 for s in states)
    assert any(float(s["exp_avg"].abs().sum()) > 0 for s in states)
    # the HF folder loads in transformers with the same weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    for k, v in hf.state_dict().items():
        assert torch.equal(v, want[f"policy.pretrained_model.{k}"]), k
    assert (ckpt / "value_head.safetensors").is_file() and not (ckpt / "policy" / "value_head.safetensors").exists()


def test_single_rank_comm_is_identity():
    comm = Comm()
    x = torch.arange(4.0).reshape(2, 2)
    assert comm.all_reduce_sum(x) is x and comm.all_gather_rows(x) is x
    assert comm.agree_any(True) is True and comm.agree_any(False) is False
    assert comm.shard(6) == slice(0, 6) and comm.is_main and not comm.distributed
    assert comm.broadcast_str("abc") == "abc" and comm.broadcast_str("") == ""
    with pytest.raises(ValueError, match=r"rank \(2\) must lie in \[0, world_size \(2\)\)"):
        Comm(rank=2, world_size=2)
