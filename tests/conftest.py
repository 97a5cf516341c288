"""Shared fixtures. Threads follow the library's own rule (certnet.threads, applied on import),
as for every user."""

import pytest

from certnet.data import load_dataset
from certnet.errors import DataError


@pytest.fixture(scope="session")
def mnist_available() -> bool:
    try:
        load_dataset("mnist", "test")
    except DataError:
        pytest.skip("MNIST is not available on this machine")
    return True


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's exact-oracle tests, whatever the library chose."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
