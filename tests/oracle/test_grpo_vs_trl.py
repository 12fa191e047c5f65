"""Our GRPO update against TRL's `GRPOTrainer` (1.16) on the real model, as an independent oracle.

Policy: SmolLM2-135M-Instruct after a short SFT (`conftest.sft_policy_dir`); reference: the base model (beta > 0,
so the KL term is far from 0). A fixed batch: two chat prompts of equal length, three completions each sampled
from the policy (cut after the first `<|im_end|>`), fixed scores. Both trainers make two optimizer steps on that
one batch: the first at the sampler's weights (ratios exactly 1), the second after one AdamW step, where the
policy differs from the sampler's log-probs (pi_old) and from the reference: ratios away from 1 and clipping
engaged on some tokens (asserted). For each optimizer step, compared within 1e-4: the total loss (clipped
surrogate + beta * KL), the mean KL term, the clipped-token fraction, and the gradient norm (before clipping;
relative to the norm, see the test).

Ours: `PPOTrainer.step` with `advantage_estimator="grpo"` (group-normalised scores, std with Bessel's correction,
eps 1e-4), `ppo_epochs=2` on one minibatch, the KL as a loss term (`kl_in_reward=False`, `kl_penalty="k3"`,
fixed `init_kl_coef`), every token loss summed and divided by the minibatch's token count. TRL options matched:
`loss_type="dapo"` (sum over the batch's tokens / their number; equal to "bnpo" on one process without
accumulation), `scale_rewards="group"`, `num_iterations=2` (the batch reused, `old_per_token_logps` from the
sampler's weights), `beta`, `use_bias_correction_kl=False` (TRL 1.16's default True multiplies the k3 term by the
ratio: same loss value, a different gradient even at ratio 1, 10.74 against 8.20 on one batch here; ours has no such
option), `epsilon` = `cliprange` (symmetric), `temperature` 1, `max_grad_norm` 1.0,
`optim="adamw_torch_fused"`, constant learning rate, no warmup, `bf16=False`. The completions reach TRL through
`rollout_func` (no generation: the same token ids), its reference is the base model (`GRPOTrainer` loads it from
the policy's `config._name_or_path`). Not compared: TRL's sequence-level `loss_type`s ("grpo", "dr_grpo"), which
ours has no option for, and TRL's vLLM importance-sampling correction (needs `use_vllm`), our `tis`.
"""

from __future__ import annotations

import pytest
import torch

from tests.oracle.real_models import SYSTEM, load_pair

trl = pytest.importorskip("trl")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]  # minutes on two CPU cores: `make test-slow`

BETA = 0.1
CLIP = 0.2
LEARNING_RATE = 5e-6
GROUP = 3
MAX_NEW_TOKENS = 16
TOL = 1e-4
QUESTIONS = ("Compute 4 + 7.", "Compute 6 + 9.")
SCORES = (1.0, 0.0, 0.25, 0.0, 1.0, 0.75)


@pytest.fixture(scope="module")
def fixed_batch(sft_policy_dir, real_model_dir):
    """(prompt texts, prompt ids, completion ids, sampler log-probs): GROUP completions per prompt sampled from the
    policy (seeded, temperature 1), each cut after its first end-of-turn token."""
    tokenizer, policy, _ = load_pair(sft_policy_dir, real_model_dir)
    texts = [tokenizer.apply_chat_template([SYSTEM, {"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompt_ids}) == 1, "equal prompt lengths: no left padding on either side"
    torch.manual_seed(0)
    ids = torch.tensor(prompt_ids).repeat_interleave(GROUP, 0)  # [B, P]
    out = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    logps = torch.stack(out.scores, 1).log_softmax(-1)  # [B, T, V]
    new = out.sequences[:, len(prompt_ids[0]):]  # [B, T]
    completions, sampler_logps = [], []
    for row, row_logps in zip(new.tolist(), logps):
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        completions.append(row[:n])
        sampler_logps.append(row_logps[torch.arange(n), torch.tensor(row[:n])].tolist())
    return texts, [p for p in prompt_ids for _ in range(GROUP)], completions, sampler_logps


def _ours(sft_policy_dir, real_model_dir, batch, monkeypatch):
    """Our step's per-optimizer-step metrics and the [min, max] of its ratios in the second optimizer step."""
    from rlhf_engine.trainer import losses
    from rlhf_engine.trainer.ppo import trainer as ppo
    from rlhf_engine.trainer.ppo.config import PPOConfig

    _, prompt_ids, completions, _ = batch
    tokenizer, policy, ref = load_pair(sft_policy_dir, real_model_dir)
    config = PPOConfig(batch_size=len(completions), mini_batch_size=len(completions), ppo_epochs=2,
                       advantage_estimator="grpo", num_generations=GROUP, kl_in_reward=False, kl_penalty="k3",
                       init_kl_coef=BETA, adap_kl_ctrl=False, cliprange=CLIP, learning_rate=LEARNING_RATE,
                       max_grad_norm=1.0, temperature=1.0, seed=0)
    trainer = ppo.PPOTrainer(config, model=policy, ref_model=ref, tokenizer=tokenizer)
    updates, ratios = [], []
    real_update, real_policy_loss = ppo.ppo_update, losses.ppo_policy_loss

    def update_spy(*args, **kwargs):  # records what the step did; changes nothing
        updates.append(real_update(*args, **kwargs))
        return updates[-1]

    def policy_loss_spy(logp, old_logp, advantages, mask, *args, **kwargs):
        ratio = torch.exp(logp - old_logp).detach()[mask > 0]
        ratios.append((float(ratio.min()), float(ratio.max())))
        return real_policy_loss(logp, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", update_spy)
    monkeypatch.setattr(losses, "ppo_policy_loss", policy_loss_spy)
    trainer.step([torch.tensor(p) for p in prompt_ids], [torch.tensor(c) for c in completions], list(SCORES))
    stats = updates[0].stats
    assert updates[0].optimizer_steps == 2 and len(ratios) == 2
    per_step = [{"loss": float(stats["ppo/loss/total"][i]), "grad_norm": float(stats["ppo/grad_norm"][i]),
                 "kl": float(stats["ppo/loss/kl"][i]), "clipped": float(stats["ppo/policy/clipfrac"][i])}
                for i in range(2)]
    return per_step, ratios[1]


def _trl(tmp_path, sft_policy_dir, real_model_dir, batch):
    """TRL's per-optimizer-step metrics from its training logs."""
    from datasets import Dataset

    texts, prompt_ids, fixed_completions, sampler_logps = batch
    tokenizer, policy, _ = load_pair(sft_policy_dir, real_model_dir)
    policy.config._name_or_path = str(real_model_dir)  # GRPOTrainer's reference: the base model
    rows: list[int] = []  # the batch's rows in the order the rollout served them

    def rollout(prompts, trainer):  # the fixed completions of each prompt, in order, instead of generation
        seen: dict[str, int] = {}
        rows.clear()
        for p in prompts:
            rows.append(texts.index(p) * GROUP + seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1
        return {"prompt_ids": [prompt_ids[k] for k in rows], "completion_ids": [fixed_completions[k] for k in rows],
                "logprobs": [sampler_logps[k] for k in rows]}

    def fixed_score(prompts, completions, completion_ids, **kwargs):
        assert completion_ids == [fixed_completions[k] for k in rows]
        return [SCORES[k] for k in rows]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(fixed_completions),
                          num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, num_iterations=2, max_steps=2,
                          learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
                          epsilon=CLIP, loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False,
                          temperature=1.0, max_grad_norm=1.0,
                          weight_decay=0.0, optim="adamw_torch_fused", logging_steps=1, bf16=False, use_cpu=True,
                          gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0,
                          disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=fixed_score, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": t} for t in texts]), rollout_func=rollout)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2], "two optimizer steps on one rollout (num_iterations=2)"
    assert sorted(rows) == list(range(len(fixed_completions))), "every fixed completion once"
    return [{"loss": r["loss"], "grad_norm": r["grad_norm"], "kl": r["kl"], "clipped": r["clip_ratio/region_mean"]}
            for r in logs]


def test_grpo_loss_and_gradient_norm_equal_trl_with_ratios_away_from_1(tmp_path, sft_policy_dir, real_model_dir,
                                                                        fixed_batch, monkeypatch):
    ours, (ratio_min, ratio_max) = _ours(sft_policy_dir, real_model_dir, fixed_batch, monkeypatch)
    theirs = _trl(tmp_path, sft_policy_dir, real_model_dir, fixed_batch)
    print(f"ours {ours}\nTRL  {theirs}\nratios in step 2: [{ratio_min:.4f}, {ratio_max:.4f}]")
    for step, (o, t) in enumerate(zip(ours, theirs), start=1):
        # the gradient norm relative to its size: a sum of squares over 135 M fp32 gradients, where the group's
        # advantages cancel (the norm of one token's log-prob gradient is ~100x the loss gradient's)
        diffs = {k: abs(o[k] - t[k]) / (max(1.0, abs(t[k])) if k == "grad_norm" else 1.0) for k in o}
        assert max(diffs.values()) < TOL, f"optimizer step {step}: ours {o}, TRL {t}, |diff| {diffs}"
    # far from the trivial point: the policy is not the reference (KL term), and in the second step not the
    # sampler (ratios away from 1, some tokens clipped)
    assert all(o["kl"] > 1e-2 for o in ours), ours
    assert ours[0]["clipped"] == 0.0 and ours[1]["clipped"] > 0.0, ours
    assert ratio_min < 1 - CLIP or ratio_max > 1 + CLIP, (ratio_min, ratio_max)
