"""2-rank worker: the prompt records' fields reach the reward function on every trainer rank.

Rank 0 holds a SampleBatch with columns (one JSON value per sample); the real broadcast hands it to rank 1, and
each rank's `PPOTrainer.score` calls the reward function on its share. Writes <out>/rank<r>.json: the columns
each rank received, what its reward function got, and the gathered scores.
"""

import json
import sys
from pathlib import Path

import torch

from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.distributed import Comm, broadcast_samples, destroy_process_group, init_process_group
from rlhf_engine.distributed.config import DistributedConfig
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.trainer import PPOTrainer

SEEN = []


def reward(prompts, completions, answer, meta):
    SEEN.append({"answer": list(answer), "meta": list(meta)})
    return [float(a) for a in answer]


def main(out: Path) -> None:
    info, device = init_process_group(DistributedConfig(backend="gloo", timeout_s=60))
    comm = Comm.from_process_group(device)
    tokenizer = build_tokenizer(300)
    spec = TinyLlamaSpec(vocab_size=300, hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128)
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, response_length=4, advantage_estimator="grpo", num_generations=2)
    trainer = PPOTrainer(config=cfg, model=build_llama(spec, tokenizer, seed=0), tokenizer=tokenizer,
                         reward_fn=reward, comm=comm, parallel=DistributedConfig(backend="gloo", fsdp=False))
    mine = None
    if comm.is_main:
        queries = [torch.tensor([5, 6]), torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([7])]
        responses = [torch.tensor([9]), torch.tensor([10, 11]), torch.tensor([12]), torch.tensor([13])]
        mine = SampleBatch(queries, responses, columns={"answer": [1, 1, 2, 2],
                                                      "meta": [{"k": "é"}, {"k": "é"}, None, None]})
    batch = broadcast_samples(comm, mine)
    scores = trainer.score(batch.prompt_ids, batch.response_ids, batch.columns)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(
        {"columns": batch.columns, "seen": SEEN, "scores": scores.tolist()}))
    destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
