"""Fixtures and settings of the test suite. tests/ is a package: shared helpers are imported as `tests.helpers`
(and `tests.htwa_dense`), found through the repository root that the root conftest.py puts on sys.path."""

import os

import pytest
import torch
from hypothesis import settings

# CI runs every property test on the same examples (no flaky reruns); locally hypothesis explores afresh.

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
