import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same global RNG state, so a failure reproduces on its own.
    torch.manual_seed(0)
    yield
