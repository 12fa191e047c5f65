import pytest

from rlhf_engine.models.tiny import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(512)
