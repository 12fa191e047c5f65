"""Packed forward passes equal the padded ones: layout, log-probs, values, gradients, reward scores, a
whole PPO step; models that cannot pack fall back to padding with one warning."""

import warnings

import pytest
import torch

from rlhf_engine.models.reward_scoring import model_scores
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.passes.layout import PackingSupport
from rlhf_engine.trainer.passes.packing import pack_rows, packed_scores
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, forward_values, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer
from tests.helpers.steps import assert_same_step, step_and_weights

# fp32: packed and padded passes run the same math on differently shaped matmuls and attention masks
ATOL, RTOL = 2e-5, 1e-4
B = 8


@pytest.fixture
def pairs(tokenizer, random_pairs):
    return random_pairs(B, seed=3, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))


def test_pack_rows_layout():
    # query [5, 6] (left-padded by one) + response [7, 8]; query [9] + response [10]; query [11] + response [12]
    # rows of W = 4 (the longest sample), first-fit-decreasing: sample 0 fills row 0, samples 1 and 2 share row 1
    pad = 0
    batch = make_token_batch([torch.tensor([5, 6]), torch.tensor([9]), torch.tensor([11])],
                             [torch.tensor([7, 8]), torch.tensor([10]), torch.tensor([12])], pad, ())
    p = pack_rows(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width,
                  batch.response_mask)
    assert p.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert p.labels.tolist() == [[7, 8, 10, 12]]
    assert p.predict_index.tolist() == [1, 2, 4, 6]  # flat positions of the token before each response token
    assert p.last_index.tolist() == [3, 5, 7]
    assert p.gather(torch.arange(8.0).reshape(2, 4)).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert p.unpack(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[1.0, 2.0], [3.0, 0.0], [4.0, 0.0]]


def test_pack_rows_tail_continues_the_last_sequence():
    # lengths 5 and 2: W = 5, two rows; row 1 holds 2 tokens and 3 of padding at positions 2, 3, 4
    batch = make_token_batch([torch.tensor([5, 6, 7]), torch.tensor([9])],
                             [torch.tensor([8, 4]), torch.tensor([10])], 0, ())
    p = batch.pack()
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 4], [9, 10, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("layers", [1, 2])
def test_packed_policy_pass_equals_padded(make_lm, tokenizer, pairs, layers):
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=1, layers=layers))
    batch = make_token_batch(*pairs, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    outs, grads = [], []
    for packed in (False, True):
        model.zero_grad()
        out = forward_policy(model, batch, 0.7, with_values=True, with_entropy=True, keep_logits=True, packed=packed)
        weights = torch.linspace(-1, 1, out.logp.numel()).reshape(out.logp.shape) * batch.response_mask
        ((out.logp * weights).sum() + out.values.sum() + out.entropy.sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    padded, packed = outs
    for name in ("logp", "entropy", "values", "logits"):
        torch.testing.assert_close(getattr(packed, name) * _mask(batch, getattr(packed, name)),
                                   getattr(padded, name) * _mask(batch, getattr(padded, name)), atol=ATOL, rtol=RTOL)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=RTOL, msg=name)


def _mask(batch, t):
    m = batch.response_mask
    return m if t.ndim == 2 else m[..., None]


def test_packed_critic_values_and_reward_scores_equal_padded(make_lm, make_reward_model, tokenizer, pairs):
    critic = AutoModelForCausalLMWithValueHead(make_lm(seed=2))
    batch = make_token_batch(*pairs, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        torch.testing.assert_close(forward_values(critic, batch, packed=True), forward_values(critic, batch),
                                   atol=ATOL, rtol=RTOL)
        rm = make_reward_model(seed=4).eval()
        expected = model_scores(rm, batch.input_ids, batch.attention_mask, batch.position_ids)
        torch.testing.assert_close(packed_scores(rm, batch.pack()), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_packed_step_equals_padded_step(make_lm, tokenizer, pairs, estimator):
    queries, responses = pairs
    if estimator == "grpo":  # groups of 2 equal prompts
        queries = [queries[i - i % 2] for i in range(B)]
    results = []
    for packing in (False, True):
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=2,
                        learning_rate=1e-3, advantage_estimator=estimator, num_generations=2, packing=packing)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        # SGD: Adam's g / sqrt(v) would blow rounding noise in near-zero gradients up to +-lr
        trainer = PPOTrainer(cfg, model, tokenizer=tokenizer, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        assert trainer.layout.policy == packing and trainer.layout.ref == packing
        results.append(step_and_weights(trainer, queries, responses, torch.linspace(-1, 1, B)))
    assert_same_step(*results)


class _NoPositionIds(torch.nn.Module):
    """A causal LM whose forward has no position_ids argument."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)


def test_model_without_position_ids_falls_back_with_one_warning(make_lm):
    supports = PackingSupport()
    a, b = _NoPositionIds(make_lm(seed=0)), _NoPositionIds(make_lm(seed=1))
    with pytest.warns(RuntimeWarning, match="_NoPositionIds does not support packed sequences"):
        assert supports(a) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second model of the class: no second warning
        assert supports(b) is False
        assert supports(make_lm(seed=2)) is True


def test_bf16_models_pack(make_lm, make_reward_model):
    supports = PackingSupport()
    assert supports(make_lm(seed=0).to(torch.bfloat16)) is True
    assert supports(make_reward_model(seed=1).to(torch.bfloat16)) is True


def test_packed_pass_runs_the_lm_head_only_where_a_response_token_is_predicted(make_lm, tokenizer, pairs):
    lm = make_lm(seed=0)
    rows = []
    lm.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    batch = make_token_batch(*pairs, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        forward_policy(lm, batch, 1.0, packed=True)
    assert rows == [int(batch.response_mask.sum())]  # N positions, not the R x W of the packed rows
    assert rows[0] < batch.pack().input_ids.numel() / 2
