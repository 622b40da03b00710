"""A second, independent HTWA reference, used only in tests: the full L x L attention over all grid tokens with
the mask formula of spec 1.4 (exact exclusion) and the bias row from spec 1.3's in-window coordinates. No roll,
no partition, no padding: it shares nothing with lfvila_kernels.reference but the definition (the bias row
formula comes from lfvila_kernels.geometry, checked against the official index by tests/test_htwa_index.py)."""

from __future__ import annotations

import torch

from lfvila_kernels import geometry


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def htwa_dense(q, k, v, bias_table, window, shift=(0, 0, 0), bias_window=None, scale=None):
    B, T, H, W, heads, D = q.shape
    bias_window = tuple(window) if bias_window is None else tuple(bias_window)
    scale = D ** -0.5 if scale is None else scale
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pos = [t.reshape(-1), h.reshape(-1), w.reshape(-1)]  # L each
    same = torch.ones(T * H * W, T * H * W, dtype=torch.bool)
    c = []
    for x, win, s in zip(pos, window, shift):
        g = _floor_div(x - s, win)
        same &= g[:, None] == g[None, :]
        c.append(x - s - win * g)  # (x - s) mod win
    n = (c[0] * window[1] + c[1]) * window[2] + c[2]  # flat in-window index, window geometry
    a = geometry.bias_key(n, bias_window)  # n read back in bias_window geometry, flattened with the row strides
    row = geometry.bias_center(bias_window) + a[:, None] - a[None, :]

    qf, kf, vf = (x.reshape(B, -1, heads, D).transpose(1, 2) for x in (q, k, v))  # B, heads, L, D
    logits = (qf @ kf.transpose(-1, -2)) * scale
    if bias_table is not None:
        logits = logits + bias_table[row].permute(2, 0, 1).to(logits.dtype)
    logits = logits.masked_fill(~same, float("-inf"))
    out = logits.softmax(-1) @ vf
    return out.transpose(1, 2).reshape(B, T, H, W, heads, D)
