"""Helpers shared by the InfoNCE backend tests (test_losses_triton.py, test_losses_chunked.py)."""

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
