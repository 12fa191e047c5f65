"""Padding waste of the trainer: one PPO step on variable-length responses, padded against packed.

    python benchmarks/e2e/padding.py SPEC.json RESULT.json

SPEC.json: `{"model", "batch_size", "num_generations", "min_length", "max_length", "steps", "threads",
"estimator", "prompt_length"}`. The responses are random tokens with lengths spread evenly over [min_length,
max_length] (what stop tokens do to a batch), the prompts those of the benchmark's task (`prompt_length` 0)
or random ones of `prompt_length` tokens, each prompt `num_generations` times. The layouts: `padded`,
`packed` (one query per sample), `shared` (packed, a group's samples share its query). For each layout the same
batch goes through `PPOTrainer.step` `steps` times (the first is left out as warm-up); the result holds
the seconds per step and its phases, and the tokens the trainer processed per useful token, counted from
the micro-batches the passes ran on:

  trunk   positions through the transformer: padded B_mb x width_mb per micro-batch, packed and shared R x W
          (the real tokens and the tails of the packed rows)
  lm_head positions through the LM head: padded B_mb x (T_mb + 1), packed the N response tokens
  useful  real tokens (query + response up to EOS) / response tokens
"""

from __future__ import annotations

import sys
import time


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.data import synthetic
    from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
    from rlhf_engine.trainer.passes.microbatch import plan_microbatches
    from rlhf_engine.trainer.ppo.config import PPOConfig
    from rlhf_engine.trainer.ppo.experience import make_token_batch
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    b, k = spec["batch_size"], spec["num_generations"]
    g = torch.Generator().manual_seed(0)
    vocab = len(tok)
    if spec.get("prompt_length", 0):
        prompts = [torch.randint(4, vocab, (spec["prompt_length"],), generator=g) for _ in range(b // k)]
    else:
        prompts = [tok(p, return_tensors="pt").input_ids[0] for p in synthetic.prompts(b // k, seed=0)]
    queries = [p for p in prompts for _ in range(k)]
    lengths = torch.linspace(spec["min_length"], spec["max_length"], b).round().long()
    lengths = lengths[torch.randperm(b, generator=g)].tolist()
    responses = [torch.randint(4, vocab, (n,), generator=g) for n in lengths]  # no EOS: lengths as drawn
    scores = torch.randn(b, generator=g)
    out = {"lengths": lengths, "layouts": {}}
    for layout in ("padded", "packed", "shared"):
        cfg = PPOConfig(batch_size=b, mini_batch_size=b, ppo_epochs=1, learning_rate=1e-5,
                        advantage_estimator=spec["estimator"], num_generations=k, init_kl_coef=0.05,
                        adap_kl_ctrl=False, packing=layout != "padded", share_prompts=layout == "shared")
        model = AutoModelForCausalLMWithValueHead(AutoModelForCausalLM.from_pretrained(spec["model"]))
        trainer = PPOTrainer(cfg, model, tokenizer=tok)
        batch = make_token_batch(queries, responses, trainer.pad_token_id, ())  # no end of turn: lengths as drawn
        plan = plan_microbatches(batch.lengths(), cfg.max_tokens_per_microbatch, cfg.mini_batch_size)
        trunk = lm_head = 0
        for rows in plan:
            mb = batch.select(torch.tensor(rows))
            # R x W, with the rows' tails; shared: where that is cheaper (what the passes run)
            packed_rows = mb.pack(trainer.layout.attention_width).input_ids.numel() if cfg.packing else 0
            trunk += packed_rows if cfg.packing else mb.input_ids.numel()
            # packed, the LM head runs at the positions that predict a response token; padded, on the last T + 1
            # columns
            lm_head += int(mb.response_mask.sum()) if cfg.packing else mb.response_ids.shape[0] * (mb.response_width + 1)
        steps = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            stats = trainer.step(queries, responses, scores)
            times = {key: value for key, value in stats.items() if key.startswith("time/ppo/")}
            steps.append({"s": time.perf_counter() - t0, **times})
        steady = steps[1:] or steps
        assert (trainer.layout.attention_width > 0) == cfg.share_prompts, trainer.layout
        out["layouts"][layout] = {
            "s_per_step": sum(s["s"] for s in steady) / len(steady),
            "experience_fwd_s": sum(s["time/ppo/forward_pass"] for s in steady) / len(steady),
            "update_s": sum(s["time/ppo/optimize_step"] for s in steady) / len(steady),
            "trunk_positions": trunk, "lm_head_positions": lm_head,
            "real_tokens": int(batch.attention_mask.sum()), "response_tokens": int(batch.response_mask.sum()),
            "trunk_per_useful_token": trunk / int(batch.attention_mask.sum()),
            "lm_head_per_response_token": lm_head / int(batch.response_mask.sum()),
            "steps": steps,
        }
    return out


if __name__ == "__main__":
    from child import spec_main  # this folder is the script's

    sys.exit(spec_main(run, __doc__))
