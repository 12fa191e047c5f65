"""Fixtures for model tests: a tiny Llama + tokenizer folder and fresh tiny Llamas loaded from it."""

import pytest

from rlhf_engine.models.tiny import TinyLlamaSpec, make_tiny_model_dir
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A randomly initialised tiny Llama (hidden 128, 2 layers, vocab 512) + tokenizer folder."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("lora_base") / "model", TinyLlamaSpec())


@pytest.fixture
def load_base(base_dir):
    """load_base() -> a fresh `LlamaForCausalLM` from `base_dir`."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(base_dir)
