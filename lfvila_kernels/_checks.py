"""Argument checks shared by every public op. They run first, raise ValueError/TypeError naming the argument and
the expected value, and normalise int-or-tuple arguments. No asserts for user input."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128


def as_triple(value, name: str) -> tuple[int, int, int]:
    """Accept an int or a sequence of 3 ints; return a tuple of 3 Python ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or 3 ints, got {value!r}")
    if isinstance(value, int):
        return (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of 3 ints (t, h, w), got {value!r}") from None
    if len(items) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise TypeError(f"{name} must be 3 ints (t, h, w), got {value!r}")
    return tuple(int(x) for x in items)  # type: ignore[return-value]


def check_tensor(x, name: str, *, ndim: Optional[int] = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {x.dim()} ({name}.shape={tuple(x.shape)})")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {x.dtype}")


def check_same(tensors: Sequence[torch.Tensor], names: Sequence[str], what: str) -> None:
    first = tensors[0]
    for t, n in zip(tensors[1:], names[1:]):
        a, b = getattr(first, what), getattr(t, what)
        if what == "shape":
            a, b = tuple(a), tuple(b)
        if a != b:
            raise ValueError(f"{names[0]} and {n} must have the same {what}: {names[0]}.{what}={a}, {n}.{what}={b}")


def htwa_num_bias_rows(bias_window: tuple[int, int, int]) -> int:
    bt, bh, bw = bias_window
    return (2 * bt - 1) * (2 * bh - 1) * (2 * bw - 1)


def check_htwa_args(q, k, v, bias_table, window, shift, bias_window, scale):
    """Validate htwa_attention's arguments; return (window, shift, bias_window, scale) normalised."""
    check_tensor(q, "q", ndim=6)
    check_tensor(k, "k", ndim=6)
    check_tensor(v, "v", ndim=6)
    check_same([q, k, v], ["q", "k", "v"], "shape")
    for t, n in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"q and {n} must have the same dtype: q.dtype={q.dtype}, {n}.dtype={t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {n} must be on the same device: q.device={q.device}, {n}.device={t.device}")
    B, T, H, W, heads, D = q.shape
    if min(B, T, H, W, heads, D) == 0:
        raise ValueError(f"q must have no empty dimension, got q.shape={tuple(q.shape)} (B, T, H, W, heads, D)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D (q.shape[-1]) must be <= {MAX_HEAD_DIM}, got {D}")

    window = as_triple(window, "window")
    shift = as_triple(shift, "shift")
    bias_window = window if bias_window is None else as_triple(bias_window, "bias_window")
    grid = (T, H, W)
    for i, axis in enumerate("thw"):
        if window[i] <= 0:
            raise ValueError(f"window must be positive in every axis, got window={window}")
        if window[i] > grid[i]:
            raise ValueError(
                f"window must not exceed the token grid: window={window}, grid (T, H, W)={grid} "
                f"(axis {axis}); shrink the window to the grid as LF-VILA's get_window_size does"
            )
        if not 0 <= shift[i] < window[i]:
            raise ValueError(f"shift must satisfy 0 <= shift < window per axis, got shift={shift}, window={window}")
        if bias_window[i] < window[i]:
            raise ValueError(
                f"bias_window must be >= window in every axis (it is the configured window the bias table was "
                f"built for), got bias_window={bias_window}, window={window}"
            )

    if bias_table is not None:
        check_tensor(bias_table, "bias_table", ndim=2)
        rows = htwa_num_bias_rows(bias_window)
        if tuple(bias_table.shape) != (rows, heads):
            raise ValueError(
                f"bias_table must have shape ((2Bt-1)(2Bh-1)(2Bw-1), heads) = ({rows}, {heads}) for "
                f"bias_window={bias_window}, got bias_table.shape={tuple(bias_table.shape)}"
            )
        if bias_table.device != q.device:
            raise ValueError(
                f"bias_table must be on q's device: q.device={q.device}, bias_table.device={bias_table.device}"
            )

    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    elif not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    return window, shift, bias_window, float(scale)
