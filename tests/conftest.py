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
