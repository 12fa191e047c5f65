"""2-rank worker: Comm collectives, the sample-batch broadcast, FSDP2 weight gather, DCP save.

Writes <out>/rank<r>.json with what each rank saw, and a DCP checkpoint at <out>/ckpt.
"""

import json
import sys
from pathlib import Path

import torch

from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed import (
    Comm,
    DistributedConfig,
    broadcast_samples,
    destroy_process_group,
    init_process_group,
    iter_full_state,
    shard_model,
)
from rlhf_engine.distributed.dcp import save_sharded
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.export import save_gathered


def sample_batch() -> SampleBatch:
    g = torch.Generator().manual_seed(3)
    prompt_ids = [torch.randint(4, 300, (n,), generator=g) for n in (2, 5, 3, 4)]
    response_ids = [torch.randint(4, 300, (n,), generator=g) for n in (1, 6, 2, 3)]
    return SampleBatch(prompt_ids, response_ids, scores=torch.tensor([0.5, -1.0, 2.0, 0.0]),
                       behaviour_logp=[-torch.rand(len(r), generator=g) for r in response_ids],
                       policy_versions=[torch.tensor([0]), torch.tensor([1, 1, 1, 2, 2, 2]), torch.tensor([1, 1]),
                                        torch.tensor([2, 2, 2])],
                       loss_mask=[torch.rand(len(r), generator=g) > 0.3 for r in response_ids])


def main(out: Path) -> None:
    info, device = init_process_group(DistributedConfig(backend="gloo", timeout_s=60))
    comm = Comm.from_process_group(device)
    seen = {}
    # the batch: rank 0 passes it, rank 1 reconstructs it from the broadcast
    got = broadcast_samples(comm, sample_batch() if comm.is_main else None)
    want = sample_batch()
    seen["batch_equal"] = (
        all(torch.equal(a, b) for a, b in zip(got.prompt_ids, want.prompt_ids))
        and all(torch.equal(a, b) for a, b in zip(got.response_ids, want.response_ids))
        and torch.equal(got.scores, want.scores)
        and all(torch.equal(a, b) for a, b in zip(got.behaviour_logp, want.behaviour_logp))
        and all(torch.equal(a, b) for a, b in zip(got.policy_versions, want.policy_versions))
        and all(torch.equal(a, b) for a, b in zip(got.loss_mask, want.loss_mask))
    )
    no_extras = broadcast_samples(comm, SampleBatch(want.prompt_ids, want.response_ids) if comm.is_main else None)
    seen["none_fields"] = [no_extras.scores is None, no_extras.behaviour_logp is None,
                           no_extras.policy_versions is None]
    # collectives: rank r holds r + 1
    x = torch.tensor([float(comm.rank + 1), 10.0])
    seen["sum"] = comm.all_reduce_sum(x).tolist()
    seen["x_unchanged"] = x.tolist()
    seen["gathered"] = comm.all_gather_rows(torch.full((2, 1), float(comm.rank))).flatten().tolist()
    seen["agree_rank1_only"] = comm.agree_any(comm.rank == 1)
    seen["agree_none"] = comm.agree_any(False)
    seen["str"] = comm.broadcast_str("from rank 0 ✓" if comm.is_main else None)
    seen["shard"] = [comm.shard(8).start, comm.shard(8).stop]
    # FSDP2: a value-head model sharded per layer; the gathered weights equal the unsharded model's
    tokenizer = build_tokenizer(300)
    spec = TinyLlamaSpec(vocab_size=300, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
    reference = AutoModelForCausalLMWithValueHead(build_llama(spec, tokenizer, seed=0))
    torch.manual_seed(100 + comm.rank)  # different seeds: shard_model must start every rank from rank 0's weights
    model = AutoModelForCausalLMWithValueHead(build_llama(spec, tokenizer, seed=comm.rank))
    shard_model(model, DistributedConfig(backend="gloo"), comm)
    full = dict(iter_full_state(model.pretrained_model))
    ref = reference.pretrained_model.state_dict()
    seen["gather_max_diff"] = max(float((full[k] - ref[k]).abs().max()) for k in ref)
    seen["gather_names_equal"] = sorted(full) == sorted(ref)
    seen["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    seen["full_numel"] = sum(p.numel() for p in reference.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(comm.rank))
    logits, values = model(input_ids=ids)
    (logits.float().pow(2).mean() + values.mean()).backward()
    optimizer.step()
    save_sharded(comm, out / "ckpt", {"policy": model}, optimizer, {"marker": 7, "t": torch.arange(3)},
                 write_models=lambda p: save_gathered(comm, model, p / "policy", tokenizer,
                                                       value_head_file=p / "value_head.safetensors"))
    full = {f"policy.{k}": v for k, v in iter_full_state(model)}
    if comm.is_main:
        torch.save({k: v.clone() for k, v in full.items()}, out / "full_after_step.pt")
    (out / f"rank{comm.rank}.json").write_text(json.dumps(seen))
    comm.barrier()  # neither rank leaves the group while the other still works in it (rank 0 writes files)
    destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
