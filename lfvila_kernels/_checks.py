"""Argument checks shared by every public op. They run first, raise ValueError/TypeError naming the argument and
the expected value, and normalise int-or-tuple arguments. No asserts for user input."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import geometry

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
    return geometry.num_bias_rows(bias_window)


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


# --------------------------------------------------------------------------------------------------------------
# contrastive losses

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_temperature(temperature, like: torch.Tensor, *, check_value: bool = True) -> None:
    """`temperature` is a positive finite Python float/int, or a 0-dim floating tensor on `like`'s device (or
    the CPU). `check_value=False` skips reading a tensor's value (under torch.compile, where it cannot be read)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(
                f"temperature must be a float or a 0-dim tensor, got a tensor of shape {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor, got dtype {temperature.dtype}")
        if temperature.device != like.device and temperature.device.type != "cpu":
            raise ValueError(
                f"temperature must be on the features' device ({like.device}) or the CPU, got {temperature.device}"
            )
        if check_value:
            value = float(temperature.detach())
            if not (value > 0 and value != float("inf")):
                raise ValueError(f"temperature must be a finite positive number, got {value!r}")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")


def _check_pair(x, y, nx: str, ny: str) -> None:
    if y.dtype != x.dtype:
        raise TypeError(f"{nx} and {ny} must have the same dtype: {nx}.dtype={x.dtype}, {ny}.dtype={y.dtype}")
    if y.device != x.device:
        raise ValueError(f"{nx} and {ny} must be on the same device: {nx}.device={x.device}, {ny}.device={y.device}")


def check_info_nce_args(a, b, temperature, symmetric: bool, *, check_value: bool = True) -> None:
    """a: (N, D), b: (N, D) (row i of a and row i of b are the positive pair), same float dtype and device."""
    check_tensor(a, "a", ndim=2)
    check_tensor(b, "b", ndim=2)
    _check_pair(a, b, "a", "b")
    if a.shape[0] == 0:
        raise ValueError(f"empty batch: a.shape={tuple(a.shape)}; info_nce_loss needs at least one row")
    if a.shape[1] == 0:
        raise ValueError(f"a and b must have a non-empty feature dimension, got a.shape={tuple(a.shape)}")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"a and b must have the same shape (N, D) (row i of each is a positive pair): "
            f"a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}"
        )
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    check_temperature(temperature, a, check_value=check_value)


def check_index(idx, name: str, shape: tuple, high: int, *, check_value: bool = True) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.int64), got {idx.dtype}")
    if tuple(idx.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {name}.shape={tuple(idx.shape)}")
    if check_value and idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must hold clip positions in [0, {high}), got values in [{lo}, {hi}]")


def check_mtc_args(clips, sents, key_idx, value_idx, other_idx, temperature, rolls, *, check_value: bool = True):
    """Validate temporal_contrastive_loss's arguments; return `rolls` as a tuple of ints."""
    check_tensor(clips, "clips", ndim=3)
    check_tensor(sents, "sents", ndim=3)
    _check_pair(clips, sents, "clips", "sents")
    if tuple(clips.shape) != tuple(sents.shape):
        raise ValueError(
            f"clips and sents must have the same shape (B, M, C): clips.shape={tuple(clips.shape)}, "
            f"sents.shape={tuple(sents.shape)}"
        )
    batch, m, c = clips.shape
    if batch == 0 or m == 0 or c == 0:
        raise ValueError(f"clips must have no empty dimension (B, M, C), got clips.shape={tuple(clips.shape)}")
    for t, n in ((key_idx, "key_idx"), (value_idx, "value_idx"), (other_idx, "other_idx")):
        if isinstance(t, torch.Tensor) and t.device != clips.device:
            raise ValueError(f"{n} must be on the features' device {clips.device}, got {t.device}")
    if not isinstance(key_idx, torch.Tensor) or key_idx.dim() != 2:
        raise ValueError(f"key_idx must be a (B, K) tensor, got {getattr(key_idx, 'shape', key_idx)!r}")
    if not isinstance(value_idx, torch.Tensor) or value_idx.dim() != 2:
        raise ValueError(f"value_idx must be a (B, V) tensor, got {getattr(value_idx, 'shape', value_idx)!r}")
    check_index(key_idx, "key_idx", (batch, key_idx.shape[1]), m, check_value=check_value)
    check_index(value_idx, "value_idx", (batch, value_idx.shape[1]), m, check_value=check_value)
    check_index(other_idx, "other_idx", (batch,), m, check_value=check_value)
    if key_idx.shape[1] == 0 or value_idx.shape[1] == 0:
        raise ValueError(
            f"key_idx and value_idx need at least one column, got key_idx.shape={tuple(key_idx.shape)}, "
            f"value_idx.shape={tuple(value_idx.shape)}"
        )
    try:
        rolls_t = tuple(rolls)
    except TypeError:
        raise TypeError(f"rolls must be a sequence of ints, got {rolls!r}") from None
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in rolls_t):
        raise TypeError(f"rolls must be a sequence of ints, got {rolls!r}")
    check_temperature(temperature, clips, check_value=check_value)
    return rolls_t
