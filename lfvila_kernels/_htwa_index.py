"""HTWA index math in Python: the mirror of csrc/htwa_index.h (the header the CUDA kernels and their launcher use).

The CUDA backend builds its dbias inverse index on the host in C++ (`htwa::build_bias_inverse`, the op schema has
no slot for an index tensor); this module computes the same things in PyTorch so that tests/test_htwa_index.py can
check the header (compiled by a tiny g++ driver) against it and both against the official relative position index
and the contract formulas (csrc/HTWA_CONTRACT.md). Benchmarks and debugging may use it as well.
"""

from __future__ import annotations

import torch

Triple = tuple[int, int, int]


def num_boxes(length: int, window: int, shift: int) -> int:
    """Boxes along one axis: [0, shift) when shift > 0, then windows of `window` clipped to `length`."""
    return (1 if shift > 0 else 0) + (length - shift + window - 1) // window


def axis_boxes(length: int, window: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, size, c0) of every box along one axis; c0 is the in-window coordinate (x - shift) mod window of
    the box's first token (the box covers in-window coordinates c0 .. c0 + size - 1)."""
    boxes = []
    for j in range(num_boxes(length, window, shift)):
        if shift > 0 and j == 0:
            boxes.append((0, shift, window - shift))
            continue
        start = shift + (j - 1) * window if shift > 0 else j * window
        boxes.append((start, min(start + window, length) - start, 0))
    return boxes


def bias_key(n: torch.Tensor, bias_window: Triple) -> torch.Tensor:
    """A(n): window-geometry index n read in bias_window geometry, flattened with the bias table's row strides."""
    _, bh, bw = bias_window
    t, h, w = n // (bh * bw), (n // bw) % bh, n % bw
    return (t * (2 * bh - 1) + h) * (2 * bw - 1) + w


def bias_center(bias_window: Triple) -> int:
    """C: the bias table row of the zero offset."""
    bt, bh, bw = bias_window
    return ((bt - 1) * (2 * bh - 1) + (bh - 1)) * (2 * bw - 1) + (bw - 1)


def num_bias_rows(bias_window: Triple) -> int:
    bt, bh, bw = bias_window
    return (2 * bt - 1) * (2 * bh - 1) * (2 * bw - 1)


def bias_rows(window: Triple, bias_window: Triple) -> torch.Tensor:
    """(N, N) int64, N = prod(window): the bias table row of (query n_q, key n_k), both in window geometry."""
    n = torch.arange(window[0] * window[1] * window[2], dtype=torch.int64)
    a = bias_key(n, bias_window)
    return bias_center(bias_window) + a[:, None] - a[None, :]


def bias_inverse(window: Triple, bias_window: Triple) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR inverse of `bias_rows`: (offsets (rows + 1,), pairs (N * N,)), int32. Row r's pairs are
    pairs[offsets[r]:offsets[r + 1]], each encoded n_q * N + n_k, ascending. Rows nothing maps to are empty."""
    rows = bias_rows(window, bias_window).flatten()
    pairs = torch.sort(rows, stable=True).indices  # ascending pair code inside each row
    counts = torch.bincount(rows, minlength=num_bias_rows(bias_window))
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), pairs.to(torch.int32)
