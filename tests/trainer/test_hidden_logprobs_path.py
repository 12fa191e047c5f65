"""`ppo.logprobs_from_hidden`: log-probs from the final hidden states (no [tokens, V] logits) equal the logits
path in value and gradient, padded and packed, with a value head, through a whole PPO step; models that
post-process their logits are refused."""

import pytest
import torch

from rlhf_engine.models.lm_head import check_plain_lm_head, plain_lm_head
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer
from tests.helpers.steps import assert_same_step, step_and_weights

# fp32: the hidden path multiplies the LM head chunk by chunk, the logits path in one matmul
ATOL, RTOL = 2e-5, 1e-4
B = 8


@pytest.fixture
def pairs(tokenizer, random_pairs):
    return random_pairs(B, seed=5, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))


@pytest.mark.parametrize("packed", [False, True])
def test_hidden_path_equals_logits_path_in_value_and_gradient(make_lm, tokenizer, pairs, packed):
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=1, layers=2))
    head = model.pretrained_model.lm_head
    batch = make_token_batch(*pairs, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    outs, grads = [], []
    for from_hidden in (False, True):
        model.zero_grad()
        out = forward_policy(model, batch, 0.7, with_values=True, with_entropy=True, packed=packed,
                             from_hidden=from_hidden)
        weights = torch.linspace(-1, 1, out.logp.numel()).reshape(out.logp.shape) * batch.response_mask
        ((out.logp * weights).sum() + out.values.sum() + 0.5 * out.entropy.sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.pretrained_model.lm_head is head  # the original head is back
    logits_path, hidden_path = outs
    assert hidden_path.logits is None
    for name in ("logp", "entropy", "values"):
        torch.testing.assert_close(getattr(hidden_path, name) * batch.response_mask,
                                   getattr(logits_path, name) * batch.response_mask, atol=ATOL, rtol=RTOL, msg=name)
    assert grads[0].keys() == grads[1].keys() and "pretrained_model.lm_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=RTOL, msg=name)


def test_ppo_step_from_hidden_equals_step_from_logits(make_lm, tokenizer, pairs):
    queries, responses = pairs
    results = []
    for from_hidden in (False, True):
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3,
                        logprobs_from_hidden=from_hidden)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        trainer = PPOTrainer(cfg, model, tokenizer=tokenizer, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        assert trainer.layout.from_hidden == from_hidden
        results.append(step_and_weights(trainer, queries, responses, torch.linspace(-1, 1, B)))
    assert_same_step(*results, keys=("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl",
                                      "ppo/grad_norm"))


def test_model_that_post_processes_logits_is_refused(make_lm):
    lm = make_lm(seed=0)
    assert plain_lm_head(lm)
    check_plain_lm_head(lm, "ppo.logprobs_from_hidden")  # no error

    # a logit scale applied after the head (as Cohere's logit_scale or Gemma 2's soft cap do)
    class _Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    scaled = make_lm(seed=0)
    old = scaled.lm_head
    scaled.lm_head = _Scaled(old.in_features, old.out_features, bias=False)
    assert not plain_lm_head(scaled)
    with pytest.raises(ValueError, match=r"ppo.logprobs_from_hidden: LlamaForCausalLM does not produce its logits"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, advantage_estimator="grpo", num_generations=2,
                             logprobs_from_hidden=True), scaled)


def test_full_kl_needs_logits():
    with pytest.raises(ValueError, match="kl_penalty='full' needs the logits"):
        PPOConfig(kl_penalty="full", logprobs_from_hidden=True)
    with pytest.raises(ValueError, match="kl_penalty='full' needs the logits"):
        PPOConfig(kl_penalty="full", kl_in_reward=False)


def test_lora_policy_and_its_disabled_adapter_reference_from_hidden(make_lm, tokenizer, pairs):
    # the LoRA reference is the policy's own base with adapters disabled (a wrapper): its head is found
    # through the wrapper and the step equals the logits path
    pytest.importorskip("peft")
    from rlhf_engine.models.lora import LoraConfig, apply_lora

    queries, responses = pairs
    queries = [queries[i - i % 2] for i in range(B)]
    results = []
    for from_hidden in (False, True):
        torch.manual_seed(0)  # the same fresh adapters in both runs
        policy = apply_lora(make_lm(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2, advantage_estimator="grpo",
                        num_generations=2, logprobs_from_hidden=from_hidden)
        trainer = PPOTrainer(cfg, policy, tokenizer=tokenizer)
        stats = [trainer.step(queries, responses, torch.linspace(-1, 1, B)) for _ in range(2)]
        results.append(stats[-1])
    assert results[0]["objective/kl"] != 0.0  # the adapters moved away from the base in step 1
    for key in ("ppo/loss/policy", "objective/kl", "ppo/grad_norm"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-3, abs=1e-6), key
