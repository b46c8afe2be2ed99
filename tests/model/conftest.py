"""Model tests run tiny models: one intra-op thread is faster than two and immune to other processes' load."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
