"""Fixtures of the rollout tests: one tiny Llama folder and one vLLM engine per session."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_engine.models.tiny import TinyLlamaSpec, make_tiny_model_dir

MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (hidden 128, 2 layers, vocab 512, head_dim 64) with its tokenizer."""
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rollout_model") / "tiny", TinyLlamaSpec()))


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """An fp32 transformers copy of the tiny model, for computing reference log-probs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vllm_generator(tiny_model_dir):
    """The one vLLM engine shared by every vLLM test (engine start takes ~20 s)."""
    pytest.importorskip("vllm")
    from rlhf_engine.rollout.config import GeneratorConfig
    from rlhf_engine.rollout.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(
        GeneratorConfig(
            model=tiny_model_dir, backend="vllm", max_model_len=MAX_MODEL_LEN, kv_cache_bytes=1 << 27, engine_process=True
        )
    )
    yield gen
    sockets = gen.sockets_dir
    gen.close()
    assert not os.path.exists(sockets), "the engine processes' sockets outlive the generator"
