"""Distributed mode of info_nce_loss and gather_with_grad: 2 processes on gloo (CPU) against 1 process on the
global batch.

Convention under test (documented in `info_nce_loss`): rank r returns the mean over its local rows; the average
of the ranks' losses is the global loss, and each rank's feature gradients are `world` times the global loss's
gradients for its rows (DDP's gradient averaging then gives exactly the global loss's parameter gradients, as in
the official code that computes the full loss on every rank); the temperature gradients averaged over the ranks
equal the global one.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lfvila_kernels import gather_with_grad, info_nce_loss
from lfvila_kernels.reference import info_nce_reference

WORLD = 2
N_LOCAL, D = 40, 24
CASES = [("cpp", True), ("cpp", False), ("chunked", True), ("chunked", False), ("reference", True)]


def _global_batch():
    g = torch.Generator().manual_seed(123)
    a = F.normalize(torch.randn(WORLD * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(WORLD * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    return a, b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        a, b = _global_batch()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = {}
        for backend, symmetric in CASES:
            x = a[rows].clone().requires_grad_()
            y = b[rows].clone().requires_grad_()
            t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
            loss = info_nce_loss(x, y, t, symmetric=symmetric, distributed=True, backend=backend)
            loss.backward(torch.tensor(1.5, dtype=torch.float64))  # non-unit upstream gradient
            results[(backend, symmetric)] = (loss.detach(), x.grad, y.grad, t.grad)
        # gather_with_grad alone: forward = cat of every rank's rows; backward = sum over ranks of the incoming
        # gradient, this rank's slice
        x = (torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * rank).requires_grad_()
        gathered = gather_with_grad(x)
        weight = torch.arange(WORLD * 6, dtype=torch.float64).reshape(WORLD * 3, 2) * (rank + 1)
        (gathered * weight).sum().backward()
        results["gather"] = (gathered.detach(), x.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results():
    if not dist.is_available():
        pytest.fail("torch.distributed is not available in this torch build")
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children inherit the imported modules (spawn would re-import torch and lfvila_kernels, ~10 s
        # each on a busy 2-core machine); they run single-threaded, so the parent's OpenMP pool is never reused
        ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="fork")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):  # re-raises a worker's exception
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the distributed workers did not finish within 120 s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("backend,symmetric", CASES)
def test_distributed_matches_global_batch(dist_results, backend, symmetric):
    a, b = _global_batch()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ref = info_nce_reference(x, y, t, symmetric=symmetric)
    ref.backward(torch.tensor(1.5, dtype=torch.float64))

    per_rank = [r[(backend, symmetric)] for r in dist_results]
    mean_loss = sum(p[0] for p in per_rank) / WORLD
    torch.testing.assert_close(mean_loss, ref.detach(), atol=1e-12, rtol=1e-12)
    for rank, (_, dx, dy, dt) in enumerate(per_rank):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(dx / WORLD, x.grad[rows], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(dy / WORLD, y.grad[rows], atol=1e-12, rtol=1e-10)
    mean_dt = sum(p[3] for p in per_rank) / WORLD
    torch.testing.assert_close(mean_dt, t.grad, atol=1e-10, rtol=1e-10)


def test_gather_with_grad(dist_results):
    expected = torch.cat([torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(WORLD)])
    base = torch.arange(WORLD * 6, dtype=torch.float64).reshape(WORLD * 3, 2)
    summed = base * sum(r + 1 for r in range(WORLD))  # all-reduce of every rank's upstream gradient
    for rank, (gathered, grad) in enumerate(r["gather"] for r in dist_results):
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(grad, summed[rank * 3 : (rank + 1) * 3])


def test_gather_with_grad_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    # and the distributed flag falls back to the local loss
    y = torch.randn(3, 2)
    torch.testing.assert_close(info_nce_loss(x, y, 0.1, distributed=True), info_nce_loss(x, y, 0.1))
