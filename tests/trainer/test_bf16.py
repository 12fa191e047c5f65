"""`ppo.bf16`: the trainer's forward passes run under bf16 autocast (matmuls in bf16), while weights, gradients,
optimizer state, log-probs and losses stay fp32; a PPO step in bf16 is the fp32 step up to bf16 rounding."""

import pytest
import torch

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.ops import logprobs_from_hidden
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import forward_policy, make_token_batch
from rlhf_engine.trainer.ppo.trainer import PPOTrainer
from tests.helpers.steps import step_and_weights

B = 8


@pytest.fixture
def pairs(tokenizer, random_pairs):
    return random_pairs(B, seed=5, eos=tokenizer.eos_token_id, q_len=(2, 7), r_len=(1, 9))


def _matmul_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    """The output dtypes of every nn.Linear of `model` as a forward runs (hooks to remove after)."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


def _head_op_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """(hidden, weight) dtypes of every `logprobs_from_hidden` call of the LM head (`from_hidden`), which the
    nn.Linear hooks do not see."""
    from rlhf_engine.models import lm_head

    seen = []

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return logprobs_from_hidden(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(lm_head, "logprobs_from_hidden", spy)
    return seen


@pytest.mark.parametrize("from_hidden", [False, True])
def test_bf16_pass_computes_in_bf16_and_returns_fp32_close_to_fp32(make_lm, tokenizer, pairs, from_hidden,
                                                                   monkeypatch):
    head_ops = _head_op_dtypes(monkeypatch)
    model = AutoModelForCausalLMWithValueHead(make_lm(seed=1, layers=2))
    torch.nn.init.normal_(model.v_head.summary.weight, generator=torch.Generator().manual_seed(0))  # not all 0
    batch = make_token_batch(*pairs, tokenizer.pad_token_id, (tokenizer.eos_token_id,))
    outs, grads, dtypes = [], [], []
    for compute_dtype in (None, torch.bfloat16):
        model.zero_grad()
        seen, hooks = _matmul_dtypes(model)
        head_ops.clear()
        out = forward_policy(model, batch, 0.7, with_values=True, with_entropy=True, from_hidden=from_hidden,
                             compute_dtype=compute_dtype)
        for hook in hooks:
            hook.remove()
        seen += [dtype for op in head_ops for dtype in op]
        assert bool(head_ops) == from_hidden
        assert all(op == (compute_dtype or torch.float32,) * 2 for op in head_ops)  # the head's matmuls too
        (out.logp.sum() + out.values.sum() + 0.5 * out.entropy.sum()).backward()
        outs.append(out)
        dtypes.append(set(seen))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    fp32, bf16 = outs
    assert dtypes[0] == {torch.float32} and torch.bfloat16 in dtypes[1]  # the decoder's matmuls ran in bf16
    mask = batch.response_mask
    for name in ("logp", "entropy", "values"):
        a, b = getattr(fp32, name) * mask, getattr(bf16, name) * mask
        assert b.dtype == torch.float32, name
        diff = (a - b).abs().max().item()
        # bf16 keeps 8 bits of mantissa: the results move, by far less than their own size
        assert 1e-5 < diff < 0.05 * max(a.abs().max().item(), 1.0), (name, diff)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads[0][name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def test_ppo_step_in_bf16_is_the_fp32_step_up_to_rounding(make_lm, tokenizer, pairs):
    queries, responses = pairs
    results, trainers = [], []
    for bf16 in (False, True):
        cfg = PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3, bf16=bf16)
        model = AutoModelForCausalLMWithValueHead(make_lm(seed=0))
        trainer = PPOTrainer(cfg, model, tokenizer=tokenizer)
        assert trainer.layout.compute_dtype == (torch.bfloat16 if bf16 else None)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        results.append(step_and_weights(trainer, queries, responses, torch.linspace(-1, 1, B)))
        trainers.append((trainer, before))
    (stats32, w32), (stats16, w16) = results
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl"):
        assert stats16[key] == pytest.approx(stats32[key], rel=0.05, abs=2e-3), key
    assert stats16["ppo/grad_norm"] == pytest.approx(stats32["ppo/grad_norm"], rel=0.05)
    trainer, before = trainers[1]
    state = trainer.optimizer.state
    assert state and all(t.dtype == torch.float32 for s in state.values() for t in s.values() if t.is_floating_point())
    for name, w in w16.items():
        assert w.dtype == before[name].dtype, name
        moved16, moved32 = w - before[name], w32[name] - before[name]
        if moved32.abs().max() > 0:  # each weight moves as in fp32 (Adam's first steps are sign-like)
            cos = torch.nn.functional.cosine_similarity(moved16.flatten().float(), moved32.flatten().float(), dim=0)
            assert cos > 0.9, (name, float(cos))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_hardware_warns(make_lm, tokenizer, monkeypatch, native, recwarn):
    monkeypatch.setattr("rlhf_engine.common.dtypes.cpu_has_native_bf16", lambda: native)
    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, bf16=True), AutoModelForCausalLMWithValueHead(make_lm()),
               tokenizer=tokenizer)
    emulated = [w for w in recwarn if "emulates bf16" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
