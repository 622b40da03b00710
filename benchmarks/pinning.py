"""Per-core throughput: the benchmark process (and the decoder threads it starts) pinned to one CPU."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def one_core():
    """This process on one CPU and torch on one thread while the block runs; both restored after."""
    cpus = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
