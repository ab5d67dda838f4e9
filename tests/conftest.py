"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run torch on one thread (2 shared cores: avoids OpenMP spinning against other threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
