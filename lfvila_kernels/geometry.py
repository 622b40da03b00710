"""HTWA window geometry in Python: the box split of a grid into windows, the bias rows and the inverse bias map of
the `bias_window` quirk (spec 1.3-1.4, csrc/HTWA_CONTRACT.md "Semantics"). The one Python copy of these facts,
the mirror of csrc/htwa_geometry.h (the C++ copy, used by the CPU and CUDA kernels): the Triton launcher
(triton/htwa_launch.py), the flex backend and the tests use it, and tests/test_htwa_index.py checks the two
against each other and against the official relative_position_index.

Vocabulary (one axis of length L, window Wn, shift s):
    box j      the j-th interval of the axis: [0, s) first when s > 0, then windows of Wn clipped to L.
    origin O   s - Wn when s > 0, else 0: box j is the window [O + j Wn, O + (j + 1) Wn) clipped to [0, L).
    c(x)       in-window coordinate (x - s) mod Wn; inside a box the c values are contiguous: c0 .. c0 + n - 1.
    n          flat in-window index in WINDOW geometry: (c_t Wh + c_h) Ww + c_w, in [0, N), N = Wt Wh Ww.
    A(n)       n read back in BIAS_WINDOW geometry (bt, bh, bw) and flattened with the table's row strides:
               A = (bt (2Bh - 1) + bh) (2Bw - 1) + bw. The bias row of (query, key) is C + A(n_q) - A(n_k),
               C = A(Bt - 1, Bh - 1, Bw - 1) (the zero offset).
"""

from __future__ import annotations

import torch

Triple = tuple[int, int, int]


def window_origin(window: int, shift: int) -> int:
    """Origin O of the windows along one axis: shift - window when shifted, else 0 (-window < O <= 0)."""
    return shift - window if shift > 0 else 0


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


def box_classes(length: int, window: int, shift: int) -> list[int]:
    """Per box along one axis: a class id; boxes with the same (size, c0) share it (at most 3 per axis: a front
    partial box, full boxes, a ragged end box), numbered in order of first appearance."""
    seen: dict = {}
    return [seen.setdefault((size, c0), len(seen)) for _, size, c0 in axis_boxes(length, window, shift)]


def bias_coords(n: torch.Tensor, bias_window: Triple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window-geometry index n read back as (bt, bh, bw) coordinates of the bias_window geometry."""
    _, bh, bw = bias_window
    return n // (bh * bw), (n // bw) % bh, n % bw


def bias_key(n: torch.Tensor, bias_window: Triple) -> torch.Tensor:
    """A(n): window-geometry index n read in bias_window geometry, flattened with the bias table's row strides."""
    _, bh, bw = bias_window
    t, h, w = bias_coords(n, bias_window)
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
