"""Helpers shared by the InfoNCE backend tests (test_losses.py, test_losses_triton.py, test_losses_chunked.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_features(n, d, seed, m=None):
    """fp64 unit-norm features a (n, d) and b (m or n, d), as the model's projection heads produce."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(m or n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def loss_and_grads(fn, a, b, t, upstream, **kw):
    """(loss, da, db, dtemperature) of upstream * fn(a, b, t) on fresh leaf copies."""
    x, y = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_()
    loss = fn(x, y, tt, **kw)
    return (loss.detach(),) + torch.autograd.grad(loss * upstream, (x, y, tt))


def offset_rows_case(backend, n, m, offset, dtype=torch.float64, temperature=0.3, upstream=0.6):
    """The op's rectangular form (the distributed mode's building block: rows of a (n, 24) against all of b (m, 24),
    positive of row i at column i + offset) through `lfvila::info_nce_fwd` with `backend` on `dtype` copies of fp64
    features, and through the fp64 reference. Returns (loss, lse_row, lse_col, da, db) of the op, (loss, da, db) of
    the reference and logsumexp(a b^T / t, 1), the gradients those of upstream * loss."""
    from lfvila_kernels.reference import info_nce_reference

    a, b = unit_features(n, 24, seed=n + m, m=m)
    t = torch.tensor(temperature, dtype=dtype)
    x, y = a.to(dtype, copy=True).requires_grad_(), b.to(dtype, copy=True).requires_grad_()
    loss, lse_row, lse_col = torch.ops.lfvila.info_nce_fwd(x, y, t, offset, False, backend)
    da, db = torch.autograd.grad(loss * upstream, (x, y))
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = info_nce_reference(x2, y2, temperature, symmetric=False, offset=offset)
    rda, rdb = torch.autograd.grad(ref * upstream, (x2, y2))
    got = (loss.detach(), lse_row, lse_col, da, db)
    return got, (ref.detach(), rda, rdb), torch.logsumexp(a @ b.T / temperature, 1)
