"""The stage losses against hand-computed values, and prompt masking."""

import math

import pytest
import torch

from rlhf_engine.trainer.stages.dpo import dpo_loss, sequence_logps
from rlhf_engine.trainer.stages.reward import bradley_terry_loss
from rlhf_engine.trainer.stages.sft import causal_lm_loss_sum

NEG_LOGSIG_1 = math.log(1 + math.exp(-1))  # -log sigmoid(1) = 0.313262
NEG_LOGSIG_0 = math.log(2.0)  # -log sigmoid(0) = 0.693147


def test_causal_lm_loss_hand_computed():
    # V = 2; position 0 predicts label_1 = 0 with p = 1/2; position 1 predicts label_2 = 1 with p = 3/4
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    loss, n = causal_lm_loss_sum(logits, labels)
    assert int(n) == 2
    assert loss.item() == pytest.approx(math.log(2) - math.log(0.75), rel=1e-6)  # 0.693147 + 0.287682


def test_prompt_tokens_contribute_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100  # prompt of 3 tokens
    labels[1, :5] = -100
    loss, n = causal_lm_loss_sum(logits, labels)
    loss.backward()
    # logits at t-1 predict token t: rows whose next token is masked (and the last position) get no gradient
    scored = torch.zeros(2, 6, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert int(n) == 3 + 1
    assert (logits.grad[~scored] == 0).all() and (logits.grad[scored].abs().sum(-1) > 0).all()
    changed = logits.detach().clone()
    changed[~scored] = torch.randn(int((~scored).sum()), 11)
    assert causal_lm_loss_sum(changed, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_bradley_terry_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((NEG_LOGSIG_1 + NEG_LOGSIG_0) / 2, rel=1e-6)
    # margin [1, 0] shifts the first difference to 0
    assert bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0])).item() == pytest.approx(NEG_LOGSIG_0, rel=1e-6)
    # centering: 0.5 * mean((1 + 0)^2, (0 + 0)^2) = 0.25
    assert bradley_terry_loss(chosen, rejected, center_coef=0.5).item() == pytest.approx(
        (NEG_LOGSIG_1 + NEG_LOGSIG_0) / 2 + 0.25, rel=1e-6)


def test_dpo_losses_hand_computed():
    # h = (pi_c - pi_r) - (ref_c - ref_r) = (-1 + 3) - (-2 + 2) = 2; beta * h = 1
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(NEG_LOGSIG_1, rel=1e-6)
    assert (cr.item(), rj.item()) == (0.5, -0.5)  # 0.5 * (-1 + 2), 0.5 * (-3 + 2)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.313262 + 0.1 * 1.313262
    assert smoothed.item() == pytest.approx(0.9 * NEG_LOGSIG_1 + 0.1 * (NEG_LOGSIG_1 + 1), rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0)  # (2 - 1 / (2 * 0.5))^2
    with pytest.raises(ValueError, match="loss_type \\('kto'\\)"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="kto")


class _Fixed(torch.nn.Module):
    """A 'model' whose logits are a fixed tensor."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, use_cache):
        return type("Out", (), {"logits": self.logits})()


def test_sequence_logps_sums_and_averages_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 6], [-100, 1, 2, -100, -100]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones(2, 5), "labels": labels}
    ref = torch.log_softmax(logits, -1)
    want = torch.stack([ref[0, 1, 3] + ref[0, 2, 4] + ref[0, 3, 6], ref[1, 0, 1] + ref[1, 1, 2]])
    torch.testing.assert_close(sequence_logps(_Fixed(logits), batch, average=False), want)
    torch.testing.assert_close(sequence_logps(_Fixed(logits), batch, average=True), want / torch.tensor([3.0, 2.0]))
