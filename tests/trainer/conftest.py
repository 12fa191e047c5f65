"""Fixtures for trainer tests: a tiny tokenizer (vocab 300) and tiny random Llama policies built locally."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.models.tiny import TinyLlamaSpec, build_llama, build_tokenizer
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture)

VOCAB = 300


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(VOCAB)


@pytest.fixture
def make_lm(tokenizer):
    """make_lm(seed=0, layers=1) -> a fresh tiny LlamaForCausalLM (vocab 300, hidden 128, head_dim 64)."""

    def make(seed: int = 0, layers: int = 1):
        spec = TinyLlamaSpec(vocab_size=VOCAB, hidden_size=128, num_layers=layers, num_heads=2, intermediate_size=256)
        return build_llama(spec, tokenizer, seed=seed)

    return make


@pytest.fixture
def make_reward_model(tokenizer):
    """make_reward_model(seed=0) -> a tiny random Llama sequence classifier with one label."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    def make(seed: int = 0):
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)

    return make


@pytest.fixture
def random_pairs():
    """random_pairs(n, seed, eos) -> (queries, responses), see `make_random_pairs`."""
    return make_random_pairs


def make_random_pairs(n: int, seed: int, eos: int, q_len=(2, 6), r_len=(1, 8)):
    """n (query, response) token pairs of random lengths; ids in [4, VOCAB) so no special tokens appear
    except an EOS at the end of every other response."""
    g = torch.Generator().manual_seed(seed)
    queries, responses = [], []
    for i in range(n):
        lq = int(torch.randint(q_len[0], q_len[1] + 1, (1,), generator=g))
        lr = int(torch.randint(r_len[0], r_len[1] + 1, (1,), generator=g))
        queries.append(torch.randint(4, VOCAB, (lq,), generator=g))
        r = torch.randint(4, VOCAB, (lr,), generator=g)
        if i % 2 == 0:
            r[-1] = eos
        responses.append(r)
    return queries, responses
