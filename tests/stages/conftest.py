import pytest

from rlhf_engine.models.tiny import make_tiny_model_dir
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A randomly initialised tiny Llama + tokenizer folder (the stages' starting point)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
