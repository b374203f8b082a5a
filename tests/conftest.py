"""Shared test setup: deterministic, two threads (the CI machine has two cores), fp32."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny models: their matmuls are too small to split, a second thread only waits
    (on a loaded machine the waiting made the training-loop tests 6x slower). Use it as
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
