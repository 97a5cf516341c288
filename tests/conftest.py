import pytest
import torch

from certnet.data import load_dataset
from certnet.errors import DataError


@pytest.fixture(scope="session")
def mnist_available() -> bool:
    try:
        load_dataset("mnist", "test")
    except DataError:
        pytest.skip("MNIST is not available on this machine")
    return True


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use small models: one intra-op thread avoids oversubscription (a float64 SVD with
    2 threads next to another busy process was seen to take seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
