"""Single-process parts of the model wrapping: decoder layers found, activation checkpointing exact."""

import pytest
import torch

from rlhf_engine.distributed import Comm, DistributedConfig, shard_model
from rlhf_engine.distributed.shard import clip_grad_norm, decoder_layers
from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer

SPEC = TinyLlamaSpec(vocab_size=300, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(300)


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_decoder_layers_are_the_no_split_modules(tokenizer):
    model = build_llama(SPEC, tokenizer)
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="lists no _no_split_modules"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = _grads(build_llama(SPEC, tokenizer, seed=0).eval(), ids)
    model = shard_model(build_llama(SPEC, tokenizer, seed=0).eval(), DistributedConfig(activation_checkpointing=True),
                        Comm())
    calls, mlp = [], model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # (forward hooks skip the recompute)
    checkpointed = _grads(model, ids)
    assert len(calls) == 2  # the layer ran again in backward: its activations were not kept
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)


def test_clip_grad_norm_matches_torch(tokenizer):
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    a, b = build_llama(SPEC, tokenizer, seed=0), build_llama(SPEC, tokenizer, seed=0)
    _grads(a, ids), _grads(b, ids)
    want = torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5)
    got = clip_grad_norm(Comm(), list(b.parameters()), 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-8)
