"""Value-head model save/load beside the HF folder, freezing, reward scoring."""

import torch
from transformers import AutoModelForCausalLM

from rlhf_engine.models.loading import freeze, frozen_copy
from rlhf_engine.models.reward_scoring import function_scores, load_reward_model, model_scores
from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead
from rlhf_engine.transport.weights import policy_weights


def test_save_and_load_beside_hf_folder(make_lm, tmp_path):
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=5))
    torch.nn.init.normal_(model.v_head.summary.weight)
    model.save_pretrained(tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).exists()
    # the folder is a plain causal LM for transformers (and vLLM): no value-head keys in it
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.state_dict().keys() == model.pretrained_model.state_dict().keys()
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.v_head.summary.weight, model.v_head.summary.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits_a, values_a = model(ids)
        logits_b, values_b = loaded(ids)
    torch.testing.assert_close(logits_a, logits_b)
    torch.testing.assert_close(values_a, values_b)


def test_from_plain_folder_starts_with_zero_head(make_lm, tmp_path):
    make_lm().save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    _, values = model(torch.tensor([[5, 6, 7]]))
    assert values.shape == (1, 3) and values.abs().sum() == 0


def test_frozen_copy_is_independent_and_frozen(make_lm):
    lm = make_lm()
    ref = frozen_copy(lm, "bfloat16")
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert next(ref.parameters()).dtype == torch.bfloat16
    assert all(p.requires_grad for p in lm.parameters())
    assert next(lm.parameters()).dtype == torch.float32


def test_policy_weights_use_hf_names(make_lm):
    model = AutoModelForCausalLMWithValueHead(make_lm())
    names = dict(policy_weights(model)).keys()
    assert names == model.pretrained_model.state_dict().keys()
    assert "model.embed_tokens.weight" in names and not any("v_head" in n for n in names)


def test_reward_model_scores_last_token(tokenizer, make_reward_model, tmp_path):
    make_reward_model().save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    assert not rm.training
    pad = tokenizer.pad_token_id
    # the same sequence with and without left/right padding scores the same
    ids = torch.tensor([[5, 6, 7, 8], [pad, 5, 6, 7], [5, 6, 7, pad]])
    mask = (ids != pad).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    scores = model_scores(rm, ids, mask, pos)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores[1], scores[2], rtol=1e-4, atol=1e-5)
    assert abs(float(scores[0] - scores[1])) > 1e-6


def test_function_scores_checks_length():
    out = function_scores(lambda p, c: [len(x) for x in c], ["a", "b"], ["xyz", "q"])
    assert out.tolist() == [3.0, 1.0]
    import pytest

    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        function_scores(lambda p, c: [1.0], ["a", "b"], ["x", "y"])


def test_freeze_in_place(make_lm):
    lm = make_lm()
    assert freeze(lm) is lm and not lm.training
