"""Packed rows that share each query among its samples equal the padded passes: layout, visibility, log-probs,
values, gradients, reward scores, whole PPO steps; fewer trunk tokens; models that cannot take the mask keep
one query per sample with one warning."""

import pytest
import torch

from rlhf_engine.models.reward_scoring import model_scores
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.passes.layout import pass_layout
from rlhf_engine.trainer.passes.packing import packed_scores
from rlhf_engine.trainer.passes.prompt_sharing import attention_width, pack_cheaper, shares_prompts
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, forward_values, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer
from tests.helpers.steps import assert_same_step, step_and_weights

ATOL, RTOL = 2e-5, 1e-4  # fp32: the same math on differently shaped matmuls and attention masks
B = 8
WIDE = 10**6  # an attention width at which any layout with fewer positions is the cheaper one


@pytest.fixture
def grouped(tokenizer, random_pairs):
    """4 queries x 2 samples (rows 2i and 2i + 1 share a query), varied lengths; sample 5 is dropped (no
    valid response token), as a step drops a non-finite score."""
    queries, responses = random_pairs(B, seed=5, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))
    queries = [queries[i - i % 2] for i in range(B)]
    batch = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    batch.response_mask[5] = 0
    return batch


def test_layout_shares_each_query_and_masks_other_responses():
    # query [5, 6] with responses [7, 8] and [9]; query [11] with response [12]
    batch = make_token_batch([torch.tensor([5, 6]), torch.tensor([5, 6]), torch.tensor([11])],
                             [torch.tensor([7, 8]), torch.tensor([9]), torch.tensor([12])], 0, ())
    p = batch.pack(WIDE)
    # units: [5 6 7 8 9] (5 tokens) and [11 12]: W = 5, first-fit-decreasing puts them in two rows
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0]]
    assert p.position_ids.tolist()[0] == [0, 1, 2, 3, 2]  # response [9] starts at the query's end too
    assert p.labels.tolist() == [[7, 8, 9, 12]]
    # 7 and 9 are both predicted by the query's last token (flat 1); 8 by 7; 12 by 11 (flat 5)
    assert p.predict_index.tolist() == [1, 2, 1, 5]
    assert p.last_index.tolist() == [3, 4, 6]
    visible = p.attention_mask[0, 0].int().tolist()
    assert visible == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # token 9 sees the query and itself, not the other response
    # the tail of row 1 is three tokens that see only themselves
    assert p.attention_mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                     [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_long_groups_are_cut_into_units_that_repeat_the_query():
    queries = [torch.tensor([5, 6])] * 3
    batch = make_token_batch(queries, [torch.tensor([7, 8, 9]), torch.tensor([10, 11]), torch.tensor([12])], 0, ())
    p = batch.pack(24)  # attention width 24: units cut at max(24 / 4, longest sample 5) = 6 tokens
    # [5 6 7 8 9] and [5 6 10 11 12] (2 rows of 5) rather than 3 rows of one sample each
    assert sorted(p.input_ids.tolist()) == [[5, 6, 7, 8, 9], [5, 6, 10, 11, 12]]


def test_grouped_batch_is_cheaper_shared(grouped):
    assert grouped.pack(WIDE).attention_mask is not None  # the tests below run the shared layout
    assert grouped.pack(WIDE).input_ids.numel() < grouped.pack().input_ids.numel()


def test_sharing_is_chosen_only_where_it_is_cheaper():
    def pack(queries, attention_width):
        batch = make_token_batch(queries, [torch.arange(10, 18)] * len(queries), 0, ())  # 8 response tokens
        return pack_cheaper(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width,
                            batch.response_mask, attention_width)

    q, other = torch.tensor([5, 6]), torch.tensor([7, 8])
    # one query, two samples: one row of 2 + 8 + 8 = 18 positions against two of 10
    assert pack([q, q], 100).attention_mask is not None
    assert pack([q, q], 100).input_ids.shape == (1, 18)
    # at attention width 40 units are cut at 10 tokens (the longest sample): nothing to share
    assert pack([q, q], 40).attention_mask is None
    # plus a sample of another query: rows of 18 and 10 tokens (36 positions) against three of 10 (30)
    assert pack([q, q, other], 100).attention_mask is None
    assert pack([q, q, other], 100).input_ids.shape == (3, 10)


def test_shared_policy_pass_equals_padded(make_lm, grouped):
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=1, layers=2))
    outs, grads = [], []
    for width in (0, WIDE):
        model.zero_grad()
        out = forward_policy(model, grouped, 0.7, with_values=True, with_entropy=True, keep_logits=True,
                             packed=width > 0, attention_width=width)
        weights = torch.linspace(-1, 1, out.logp.numel()).reshape(out.logp.shape) * grouped.response_mask
        ((out.logp * weights).sum() + out.values.sum() + out.entropy.sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    padded, shared = outs
    mask = grouped.response_mask
    for name in ("logp", "entropy", "values"):
        torch.testing.assert_close(getattr(shared, name) * mask, getattr(padded, name) * mask, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(shared.logits * mask[..., None], padded.logits * mask[..., None], atol=ATOL, rtol=RTOL)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=RTOL, msg=name)


def test_shared_critic_values_and_reward_scores_equal_padded(make_lm, make_reward_model, grouped):
    critic = AutoModelForCausalLMWithValueHead(make_lm(seed=2))
    with torch.no_grad():
        torch.testing.assert_close(forward_values(critic, grouped, True, WIDE), forward_values(critic, grouped),
                                   atol=ATOL, rtol=RTOL)
        rm = make_reward_model(seed=4).eval()
        expected = model_scores(rm, grouped.input_ids, grouped.attention_mask, grouped.position_ids)
        kept = grouped.response_mask.sum(dim=1) > 0  # a dropped sample's score is never used (scored before)
        torch.testing.assert_close(packed_scores(rm, grouped.pack(WIDE))[kept], expected[kept],
                                   atol=ATOL, rtol=RTOL)


def test_sharing_runs_fewer_trunk_tokens(grouped):
    queries = grouped.attention_mask[:, : grouped.prompt_width].sum(dim=1)  # [B]
    real = int(grouped.attention_mask.sum() - (grouped.attention_mask[:, grouped.prompt_width:].sum() -
                                                grouped.response_mask.sum()))  # real tokens, dropped responses off
    shared = grouped.pack(WIDE)
    tokens = int((shared.attention_mask[:, 0].diagonal(dim1=1, dim2=2) & (shared.input_ids != 0)).sum())
    assert tokens == real - int(queries[1::2].sum())  # every second sample's query is not run again


@pytest.mark.parametrize("estimator,max_tokens", [("grpo", 0), ("gae", 0), ("grpo", 24)])
def test_shared_step_equals_padded_step(make_lm, tokenizer, random_pairs, estimator, max_tokens):
    queries, responses = random_pairs(B, seed=3, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))
    queries = [queries[i - i % 2] for i in range(B)]  # groups of 2; shuffled minibatches of 4 split some
    results, trunk_tokens = [], []
    for packing, share in ((False, False), (True, False), (True, True)):
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=2,
                        learning_rate=1e-3, advantage_estimator=estimator, num_generations=2, packing=packing,
                        share_prompts=share, max_tokens_per_microbatch=max_tokens)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        seen = []
        model.pretrained_model.model.embed_tokens.register_forward_hook(
            lambda module, args, out: seen.append(args[0].numel()))
        # SGD: Adam's g / sqrt(v) would blow rounding noise in near-zero gradients up to +-lr
        trainer = PPOTrainer(cfg, model, tokenizer=tokenizer, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        assert (trainer.layout.attention_width > 0) == share
        results.append(step_and_weights(trainer, queries, responses, torch.linspace(-1, 1, B)))
        trunk_tokens.append(sum(seen))
    padded_step, _, shared_step = results
    assert_same_step(padded_step, shared_step)
    padded, packed, shared = trunk_tokens
    if not max_tokens:  # (a budget cuts the query-ordered samples into other micro-batches than unordered)
        assert shared < packed < padded  # the shared step did share queries


def test_by_prompt_keeps_groups_together(tokenizer):
    q = [torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([5, 6]), torch.tensor([8]), torch.tensor([7])]
    batch = make_token_batch(q, [torch.tensor([9])] * 5, tokenizer.pad_token_id, ())
    assert batch.by_prompt([0, 1, 2, 3, 4]) == [0, 2, 1, 4, 3]
    assert batch.by_prompt([4, 3, 2, 1]) == [4, 1, 3, 2]


class _IgnoresMask(torch.nn.Module):
    """A causal LM that drops any attention mask (as a model whose attention cannot take a 4D one)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        return self.lm(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep,
                       use_cache=use_cache)


def test_model_that_ignores_the_mask_keeps_one_query_per_sample(make_lm):
    lm = make_lm(seed=0)
    assert shares_prompts(lm) is True
    odd = _IgnoresMask(make_lm(seed=1))
    assert shares_prompts(odd) is False
    with pytest.warns(RuntimeWarning, match="_IgnoresMask does not take a custom 4D attention mask"):
        layout = pass_layout(True, lm, odd, None, None, share_prompts=True)
    assert layout.policy and layout.ref and layout.attention_width == 0
    assert pass_layout(True, lm, lm, None, None, share_prompts=True).attention_width == attention_width(lm)
    assert pass_layout(False, lm, lm, None, None, share_prompts=True).attention_width == 0  # packing off


def test_attention_width_is_matmul_flops_over_attention_flops(make_lm):
    # 1 layer, hidden 128, 2 heads x 64, MLP 256: q k v o 4 x 128^2, MLP 3 x 128 x 256, 2 norms + the final
    # norm 3 x 128 (embeddings excluded): 2 x 164224 / (4 x 128) = 641 pairs per token
    assert attention_width(make_lm(seed=0, layers=1)) == 641
    assert attention_width(torch.nn.Linear(2, 2)) == 0  # no transformers config: queries are never shared
