"""LF-VILA's HTWA layer shapes (spec 1.1-1.2): one table shared by tests and benchmarks.

Each case is one (layer, shifted?) pair of the official default config (32 frames at 192x320, head dim 32):
the token grid of the layer, its configured window, the effective window and shift after `get_window_size`
(window clipped to the grid; no shift along an axis the window covers), and the head count.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM = 32
OFFICIAL_GRIDS = [(32, 24, 40), (32, 12, 20), (32, 6, 10), (32, 6, 10), (32, 6, 10), (32, 3, 5)]
OFFICIAL_WINDOWS = [(2, 3, 5), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5), (32, 3, 5)]
OFFICIAL_HEADS = [4, 8, 16, 16, 16, 32]


def effective_window_and_shift(grid, window, shifted: bool):
    """`get_window_size` of the official code: clip the window to the grid; shift only where the grid is larger.
    The temporal shift is always 0 (`temporal_no_shifting`); the spatial shift is half the window."""
    eff = tuple(min(g, w) for g, w in zip(grid, window))
    shift = (0, window[1] // 2, window[2] // 2) if shifted else (0, 0, 0)
    shift = tuple(s if g > w else 0 for s, g, w in zip(shift, grid, window))
    return eff, shift


@dataclass(frozen=True)
class HTWACase:
    layer: int
    shifted: bool
    grid: tuple[int, int, int]  # (T, H, W) tokens
    window: tuple[int, int, int]  # effective window
    shift: tuple[int, int, int]  # effective shift
    bias_window: tuple[int, int, int]  # configured window (bias table geometry)
    heads: int
    head_dim: int = HEAD_DIM

    @property
    def name(self) -> str:
        return f"layer{self.layer}{'-shifted' if self.shifted else ''}"

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


def official_cases(reduced: bool = False) -> list[HTWACase]:
    """The 12 (layer, shifted) cases. `reduced=True` shrinks each grid for tests while still exceeding the window
    along every axis where the official grid does (2 windows per such axis), so every shift/mask case occurs."""
    cases = []
    for layer, (grid, window, heads) in enumerate(zip(OFFICIAL_GRIDS, OFFICIAL_WINDOWS, OFFICIAL_HEADS)):
        if reduced:
            grid = tuple(g if g <= w else 2 * w for g, w in zip(grid, window))
        for shifted in (False, True):
            eff, shift = effective_window_and_shift(grid, window, shifted)
            cases.append(HTWACase(layer, shifted, grid, eff, shift, window, heads))
    return cases


def make_htwa_inputs(case: HTWACase, batch: int = 1, dtype=None, device="cpu", requires_grad=False, seed=0,
                     with_bias=True):
    """The model's layout: q, k, v as strided views of one qkv projection output (B, T, H, W, 3, heads, D), plus
    a (rows, heads) bias table. Returns (qkv, (q, k, v), bias_table); gradients land in qkv.grad / bias.grad."""
    import torch

    from ._checks import htwa_num_bias_rows

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *case.grid, 3, case.heads, case.head_dim)
    qkv = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    qkv.requires_grad_(requires_grad)
    bias = None
    if with_bias:
        bias = (torch.randn(htwa_num_bias_rows(case.bias_window), case.heads, generator=gen) * 0.5).to(device)
        bias = bias.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(requires_grad)
    return qkv, qkv.unbind(4), bias
