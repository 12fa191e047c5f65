"""Held-out accuracy of one policy folder, the same way for every side of the benchmark (ours and TRL's).

    python benchmarks/e2e/heldout.py SPEC.json RESULT.json

SPEC.json: `{"model", "prompts", "reward_fn", "gold_fn", "max_prompt_length", "max_new_tokens", "max_model_len",
"dtype", "kv_cache_bytes"}` (the generator's settings of the run, `workload.Workload`). The prompts are read and rendered as the engine reads them (`read_prompts`: chat messages
through the model's template with its generation prompt), completed greedily by our vLLM generator (stopping
at the model's end-of-turn tokens), decoded and scored as the engine's own evaluation scores them
(`function_scores` with the fields each function takes): what `engine.eval_steps` logs as `eval/gold_mean`.

RESULT.json: `accuracy` (mean gold score: for the arithmetic task the strict accuracy), `reward_mean`,
`mean_length` (tokens), `passed` (prompt ids with gold > 0) and the completions' text.
"""

from __future__ import annotations

import statistics
import sys


def evaluate(spec: dict) -> dict:
    from transformers import AutoTokenizer

    from rlhf_engine.data.columns import completion_columns
    from rlhf_engine.data.prompts import read_prompts
    from rlhf_engine.engine.config import import_function
    from rlhf_engine.models.reward_scoring import function_scores
    from rlhf_engine.rollout.backends import make_generator
    from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    prompts = read_prompts(spec["prompts"], tokenizer, spec["max_prompt_length"])
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=spec["max_new_tokens"])
    config = GeneratorConfig(model=spec["model"], backend="vllm", sampling=sampling, dtype=spec["dtype"],
                             max_model_len=spec["max_model_len"],
                             kv_cache_bytes=spec["kv_cache_bytes"], engine_process=False, device="cpu")
    with make_generator(config) as generator:
        samples = generator.generate(prompts.token_ids)
    queries = tokenizer.batch_decode([s.prompt_ids for s in samples], skip_special_tokens=True)
    completions = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    rows = [prompts.columns[s.prompt_id] for s in samples]
    scores = {}
    for name in ("reward_fn", "gold_fn"):
        fn = import_function(spec[name])
        scores[name] = function_scores(fn, queries, completions, completion_columns(rows, fn, prompts.column_names),
                                       setting=name).tolist()
    return {
        "model": spec["model"],
        "prompts": len(samples),
        "accuracy": statistics.fmean(scores["gold_fn"]),
        "reward_mean": statistics.fmean(scores["reward_fn"]),
        "mean_length": statistics.fmean(len(s.response_ids) for s in samples),
        "passed": [s.prompt_id for s, g in zip(samples, scores["gold_fn"]) if g > 0],
        "completions": completions,
    }


if __name__ == "__main__":
    from child import spec_main  # this folder is the script's

    sys.exit(spec_main(evaluate, __doc__))
