"""`one_torch_thread`: an autouse fixture for test folders of tiny models, imported by their conftest."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (intra-op sync dominates), above all on a shared 2-core
    machine; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
