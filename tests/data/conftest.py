import pytest

from rlhf_engine.models.tiny import build_tokenizer
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(512)
