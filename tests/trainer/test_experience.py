"""The token batch layout and the no-grad forward passes of the experience."""

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer.ppo.experience import IGNORE_INDEX, forward_policy, forward_values, make_token_batch

PAD, EOS = 3, 2


def test_layout_masks_up_to_and_including_eos():
    queries = [torch.tensor([10, 11, 12]), torch.tensor([20])]
    responses = [torch.tensor([30, EOS, 31, 32]), torch.tensor([40, 41])]
    b = make_token_batch(queries, responses, PAD, (EOS,))
    # row 0: query fills the 3 query columns, response cut after EOS: (30, EOS), then padding
    assert b.input_ids.tolist() == [[10, 11, 12, 30, EOS], [PAD, PAD, 20, 40, 41]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert b.response_mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert b.has_eos.tolist() == [True, False]
    assert b.prompt_width == 3
    assert b.labels().tolist() == [[30, EOS], [40, 41]]


def test_every_end_of_turn_id_cuts_and_marks_a_response():
    # a model that declares two (Qwen: <|im_end|> and <|endoftext|>): the first of either ends the response
    im_end, endoftext = 7, 8
    queries = [torch.tensor([10]), torch.tensor([20]), torch.tensor([30])]
    responses = [torch.tensor([11, endoftext, 12, im_end]), torch.tensor([21, im_end, endoftext]),
                 torch.tensor([31, EOS])]
    b = make_token_batch(queries, responses, PAD, (im_end, endoftext))
    assert b.response_ids.tolist() == [[11, endoftext], [21, im_end], [31, EOS]]
    assert b.has_eos.tolist() == [True, True, False]  # EOS (2) is not one of this model's


def test_labels_ignore_padding_and_select_trims_columns():
    queries = [torch.tensor([10, 11, 12]), torch.tensor([20])]
    responses = [torch.tensor([30, 31, 32]), torch.tensor([40])]
    b = make_token_batch(queries, responses, PAD, (EOS,))
    assert b.labels().tolist() == [[30, 31, 32], [40, IGNORE_INDEX, IGNORE_INDEX]]
    one = b.select(torch.tensor([1]))
    # row 1 alone: the two left-padding columns and the two response-padding columns are dropped
    assert one.input_ids.tolist() == [[20, 40]]
    assert one.prompt_width == 1 and one.response_width == 1


def test_forward_logprobs_align_with_full_log_softmax(make_lm, tokenizer, random_pairs):
    lm = make_lm(seed=1)
    queries, responses = random_pairs(5, seed=2, eos=tokenizer.eos_token_id)
    b = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        out = forward_policy(lm, b, temperature=0.7, with_entropy=True)
    # reference: each pair alone, unpadded, through a full log_softmax at temperature 0.7
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logp_all = torch.log_softmax(lm(ids).logits[0] / 0.7, -1)  # [L, V]
        pred = logp_all[len(q) - 1 : len(q) + len(r) - 1]  # positions that predict the response
        expected = pred.gather(-1, r[:, None]).squeeze(-1)
        torch.testing.assert_close(out.logp[i, : len(r)], expected, rtol=1e-4, atol=1e-4)
        entropy = -(pred.exp() * pred).sum(-1)
        torch.testing.assert_close(out.entropy[i, : len(r)], entropy, rtol=1e-4, atol=1e-4)
        assert out.logp[i, len(r) :].abs().sum() == 0  # padding gives 0


def test_values_from_shared_pass_equal_separate_critic(make_lm, tokenizer, random_pairs):
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=3))
    torch.nn.init.normal_(model.v_head.summary.weight, std=0.5)
    queries, responses = random_pairs(4, seed=4, eos=tokenizer.eos_token_id)
    b = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with torch.no_grad():
        shared = forward_policy(model, b, 1.0, with_values=True)
        separate = forward_values(model, b)
    torch.testing.assert_close(shared.values, separate)
    assert shared.values.shape == b.response_mask.shape
    assert (shared.values[b.response_mask == 0] == 0).all()
    assert shared.values[b.response_mask == 1].abs().min() > 0


def test_values_need_a_value_head(make_lm, tokenizer, random_pairs):
    queries, responses = random_pairs(2, seed=0, eos=tokenizer.eos_token_id)
    b = make_token_batch(queries, responses, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    with pytest.raises(TypeError, match="AutoModelForCausalLMWithValueHead"):
        forward_policy(make_lm(), b, 1.0, with_values=True)


def test_logprobs_match_the_sampler_on_left_padded_prompts(make_lm, tokenizer):
    # transformers' generate on a left-padded batch scores each sampled token; the experience layout
    # (left-padded query | right-padded response, positions from the attention mask) must agree with it
    lm = make_lm(seed=2).eval()
    queries = [torch.tensor([10, 11, 12, 13, 14]), torch.tensor([20, 21])]
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[10, 11, 12, 13, 14], [pad, pad, pad, 20, 21]])
    attention_mask = (input_ids != pad).long()
    torch.manual_seed(0)
    with torch.no_grad():
        out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0, top_p=1.0,
                          max_new_tokens=6, pad_token_id=pad, eos_token_id=None, return_dict_in_generate=True,
                          output_logits=True)
    responses = [row for row in out.sequences[:, 5:]]
    sampler = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)  # [B, 6, V]
    sampler_logp = sampler.gather(-1, torch.stack(responses)[..., None]).squeeze(-1)  # [B, 6]
    batch = make_token_batch(queries, responses, pad, ())
    with torch.no_grad():
        logp = forward_policy(lm, batch, 1.0).logp
    torch.testing.assert_close(logp, sampler_logp, rtol=1e-4, atol=1e-4)
