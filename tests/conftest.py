import os
import sys

# tests import their helper modules (htwa_dense, ...) by name
sys.path.insert(0, os.path.dirname(__file__))

# CI runs every property test on the same examples (no flaky reruns); locally hypothesis explores afresh.
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: OpenMP with 2 threads on a busy 2-core machine is about 10x slower than
    1 thread for the tiny models of the training, data and CLI tests. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
