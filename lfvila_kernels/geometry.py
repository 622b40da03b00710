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


# ---- window classes: the bias tiles of the Triton kernels (triton/htwa_launch.py, triton/htwa_tiles.py) ----
#
# Boxes with the same (size, c0) along every axis are one CLASS: their tokens, flattened frame-major inside the box
# (i = (it lh + ih) lw + iw), have the same in-window indices n(i), hence the same bias rows. A grid has at most
# 3 x 3 x 3 classes; the official shapes have 1 (unshifted) to 9 (shifted). So the bias of a call is a few dense
# (NP, NP) tiles per head, indexed by box-local positions, where the per-window form reads the table through an
# index for every (query, key) pair of every window.


def box_class_ids(grid: Triple, window: Triple, shift: Triple) -> tuple[torch.Tensor, list]:
    """Per box of the grid (t-major, as the kernels number them): its class id, int64 (nbox,); and per class its
    box extent and first in-window coordinates ((lt, lh, lw), (ct, ch, cw)). Class ids combine the per-axis
    `box_classes` ids t-major, so every id in range(len(classes)) occurs."""
    per_axis = [axis_boxes(L, w, s) for L, w, s in zip(grid, window, shift)]
    ids = [box_classes(L, w, s) for L, w, s in zip(grid, window, shift)]
    n_cls = [max(c) + 1 for c in ids]
    kinds = [{} for _ in range(3)]  # axis class id -> (size, c0)
    for a in range(3):
        for (_, size, c0), c in zip(per_axis[a], ids[a]):
            kinds[a].setdefault(c, (size, c0))
    classes = []
    for ct in range(n_cls[0]):
        for ch in range(n_cls[1]):
            for cw in range(n_cls[2]):
                (lt, c0t), (lh, c0h), (lw, c0w) = kinds[0][ct], kinds[1][ch], kinds[2][cw]
                classes.append(((lt, lh, lw), (c0t, c0h, c0w)))
    it, ih, iw = (torch.tensor(c, dtype=torch.int64) for c in ids)
    box = ((it[:, None, None] * n_cls[1] + ih[None, :, None]) * n_cls[2] + iw[None, None, :]).flatten()
    return box, classes


def class_window_index(extent: Triple, c0: Triple, window: Triple) -> torch.Tensor:
    """In-window index n of each box-local token of a class (frame-major inside the box), int64 (lt lh lw,)."""
    (lt, lh, lw), (ct, ch, cw) = extent, c0
    t = torch.arange(lt)[:, None, None] + ct
    h = torch.arange(lh)[None, :, None] + ch
    w = torch.arange(lw)[None, None, :] + cw
    return ((t * window[1] + h) * window[2] + w).flatten()


def class_bias_rows(grid: Triple, window: Triple, shift: Triple, bias_window: Triple, pad: int):
    """The gather map of the bias tiles: (box_cls int64 (nbox,), rows int64 (n_classes, pad, pad), sizes list).

    rows[c, i, j] is the bias table row of box-local query i and key j of class c when both are tokens of the box
    (i, j < size_c); `nbias` (a zero column: padded query rows) when only the key is real; `nbias + 1` (a -inf
    column: the key mask) when the key is padding. `pad` >= the window's token count."""
    box, classes = box_class_ids(grid, window, shift)
    nbias = num_bias_rows(bias_window)
    table = bias_rows(window, bias_window)
    rows = torch.full((len(classes), pad, pad), nbias + 1, dtype=torch.int64)
    sizes = []
    for c, (extent, c0) in enumerate(classes):
        n = class_window_index(extent, c0, window)
        nb = n.numel()
        sizes.append(nb)
        rows[c, :, :nb] = nbias
        rows[c, :nb, :nb] = table[n[:, None], n[None, :]]
    return box, rows, sizes
