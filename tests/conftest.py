import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same global RNG state, so a failure reproduces on its own.
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny training runs (pytestmark = pytest.mark.usefixtures("one_thread")): they are all
    overhead, and one intra-op thread is several times faster on a busy 2-core machine (and the subprocesses get
    OMP_NUM_THREADS=1, so in-process and subprocess runs compute the same bits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
