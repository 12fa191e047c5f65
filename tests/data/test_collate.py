"""Padding and packing; packed loss (and gradient) equals the unpacked one on a real Llama."""

import pytest
import torch

from rlhf_engine.data import IGNORE_INDEX, TokenizedSFT, pack_sequences, packed_batch, preference_batch, sft_batch
from rlhf_engine.data.collate import left_pad, right_pad
from rlhf_engine.data.tokenize import TokenizedPair
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama
from rlhf_engine.trainer.stages.sft import causal_lm_loss_sum

PAD = 3


def test_left_and_right_pad_with_masks():
    ids, mask = left_pad([[5, 6, 7], torch.tensor([9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([[5], [6, 7, 8]], pad_id=PAD)
    assert ids.tolist() == [[5, PAD, PAD], [6, 7, 8]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def examples(lengths, prompt_len=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 512, (n,), generator=g).tolist()
        out.append(TokenizedSFT(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))
    return out


def test_sft_batch_pads_right_with_ignored_labels():
    batch = sft_batch(examples([3, 5]), PAD)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, 3:].tolist() == [PAD, PAD]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2


def test_pack_restarts_positions_and_masks_first_labels():
    exs = examples([5, 9, 3, 12, 7], prompt_len=0)
    rows = pack_sequences(exs, max_length=20)
    assert [len(r.input_ids) for r in rows] == [17, 19]  # 5+9+3 | 12+7
    assert rows[0].position_ids == list(range(5)) + list(range(9)) + list(range(3))
    assert rows[0].input_ids == exs[0].input_ids + exs[1].input_ids + exs[2].input_ids
    # every sequence's first label is dropped (never predicted across a boundary), the rest kept
    assert rows[0].labels == [IGNORE_INDEX] + exs[0].labels[1:] + [IGNORE_INDEX] + exs[1].labels[1:] + \
        [IGNORE_INDEX] + exs[2].labels[1:]
    batch = packed_batch(rows, PAD)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0, 17:].tolist() == [3, 4]  # padding continues the last sequence
    with pytest.raises(ValueError, match="sequence of 12 tokens does not fit in a packed row of max_length=10"):
        pack_sequences(exs, max_length=10)


class _Ids:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, PAD


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_grads_equal_unpacked(attn):
    model = build_llama(TinyLlamaSpec(), _Ids())
    model.config._attn_implementation = attn
    exs = examples([5, 9, 3, 12, 7])

    def loss_and_grads(batch):
        model.zero_grad()
        labels = batch.pop("labels")
        loss, n = causal_lm_loss_sum(model(**batch, use_cache=False).logits, labels)
        (loss / n).backward()
        return loss.item(), int(n), [p.grad.clone() for p in model.parameters()]

    l_pad, n_pad, g_pad = loss_and_grads(sft_batch(exs, PAD))
    l_pack, n_pack, g_pack = loss_and_grads(packed_batch(pack_sequences(exs, 20), PAD))
    assert n_pad == n_pack == sum(len(e.input_ids) - 2 for e in exs)
    assert l_pack == pytest.approx(l_pad, rel=1e-6)
    for a, b in zip(g_pad, g_pack):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_preference_batch_stacks_chosen_then_rejected():
    pairs = [TokenizedPair([5, 6, 7], [IGNORE_INDEX, 6, 7], [5, 8], [IGNORE_INDEX, 8], 1.5),
             TokenizedPair([9, 10], [IGNORE_INDEX, 10], [9, 11, 12, 13], [IGNORE_INDEX, 11, 12, 13], None)]
    batch = preference_batch(pairs, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD], [9, 10, PAD, PAD], [5, 8, PAD, PAD], [9, 11, 12, 13]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["margin"].tolist() == [1.5, 0.0]
