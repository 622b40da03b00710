"""Hierarchical temporal window attention (HTWA): LF-VILA's video-encoder attention as one op.

Three layers, FlashAttention-style: `lfvila::htwa_fwd` / `lfvila::htwa_bwd` are functional torch.library custom
ops (each with its fake kernel right below it) that dispatch to a compiled or Triton backend; `register_autograd`
ties them together; `htwa_attention` checks the arguments, picks the backend and calls the op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from .backends import cpp
from .backends._common import acc_dtype as _acc_dtype
from ._checks import check_htwa_args

__all__ = ["htwa_attention", "htwa_attention_qkv"]

_CPU_ORDER = ("cpp",)
_CUDA_ORDER = ("triton", "cuda")


# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lfvila::htwa_fwd", mutates_args=())
def _htwa_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, bias, window, shift, bias_window, scale, backend)


def _fwd_impl(q, k, v, bias, window, shift, bias_window, scale, backend):
    if backend == "triton":
        from .backends import triton

        return triton.htwa_fwd(q, k, v, bias, window, shift, bias_window, scale)
    return cpp.ops().htwa_fwd(q, k, v, bias, window, shift, bias_window, scale)


@_htwa_fwd.register_fake
def _htwa_fwd_fake(q, k, v, bias, window, shift, bias_window, scale, backend):
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:5], dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("lfvila::htwa_bwd", mutates_args=())
def _htwa_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from .backends import triton

        return triton.htwa_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale)
    return cpp.ops().htwa_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale)


@_htwa_bwd.register_fake
def _htwa_bwd_fake(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, backend):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,), dtype=_acc_dtype(q.dtype))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, window, shift, bias_window, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.has_bias = bias is not None
    ctx.params = (window, shift, bias_window, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    window, shift, bias_window, scale, backend = ctx.params
    dq, dk, dv, dbias = torch.ops.lfvila.htwa_bwd(
        dout.contiguous(), q, k, v, bias, out, lse, window, shift, bias_window, scale, backend
    )
    return dq, dk, dv, (dbias if ctx.has_bias else None), None, None, None, None, None


_htwa_fwd.register_autograd(_backward, setup_context=_setup_context)


# Packed variant: q, k, v as the slices of one (B, T, H, W, 3, heads, D) tensor (the qkv projection's output). Its
# backward returns that tensor's gradient in one piece: the C++ and Triton kernels write dq, dk, dv straight into
# it, where the unpacked op's three gradients would be stacked into it by autograd (one extra copy of the qkv
# gradient).


@torch.library.custom_op("lfvila::htwa_fwd_qkv", mutates_args=())
def _htwa_fwd_qkv(
    qkv: Tensor,
    bias: Optional[Tensor],
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(4)
    return _fwd_impl(q, k, v, bias, window, shift, bias_window, scale, backend)


@_htwa_fwd_qkv.register_fake
def _htwa_fwd_qkv_fake(qkv, bias, window, shift, bias_window, scale, backend):
    return _htwa_fwd_fake(qkv.select(4, 0), None, None, bias, window, shift, bias_window, scale, backend)


@torch.library.custom_op("lfvila::htwa_bwd_packed", mutates_args=())
def _htwa_bwd_packed(
    dout: Tensor,
    qkv: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(4)
    if backend == "cpp":
        return cpp.ops().htwa_bwd_packed(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale)
    if backend == "triton":  # writes dq, dk, dv into the slices of one gradient too
        from .backends import triton

        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _, _, _, dbias = triton.htwa_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dqkv=dqkv)
        return dqkv, dbias
    # other backends return three gradients; stack them here
    dq, dk, dv, dbias = _htwa_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, backend)
    return torch.stack((dq, dk, dv), 4), dbias


@_htwa_bwd_packed.register_fake
def _htwa_bwd_packed_fake(dout, qkv, bias, out, lse, window, shift, bias_window, scale, backend):
    dbias = bias.new_empty(bias.shape) if bias is not None else qkv.new_empty((0,), dtype=_acc_dtype(qkv.dtype))
    return qkv.new_empty(qkv.shape), dbias


def _setup_context_qkv(ctx, inputs, output):
    qkv, bias, window, shift, bias_window, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, out, lse)
    ctx.has_bias = bias is not None
    ctx.params = (window, shift, bias_window, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward_qkv(ctx, dout, _dlse):
    qkv, bias, out, lse = ctx.saved_tensors
    dqkv, dbias = torch.ops.lfvila.htwa_bwd_packed(dout.contiguous(), qkv, bias, out, lse, *ctx.params)
    return dqkv, (dbias if ctx.has_bias else None), None, None, None, None, None


_htwa_fwd_qkv.register_autograd(_backward_qkv, setup_context=_setup_context_qkv)


# --------------------------------------------------------------------------------------------------------------
# shared front half of the public functions

_TORCH_BACKENDS = ("reference", "sdpa", "flex")


def _prepare(q, k, v, bias_table, window, shift, bias_window, scale, backend):
    """Check the arguments and pick the backend; returns (backend, [window, shift, bias_window, scale])."""
    window, shift, bias_window, scale = check_htwa_args(q, k, v, bias_table, window, shift, bias_window, scale)
    if backend not in _dispatch.HTWA_BACKENDS:
        raise ValueError(f"backend must be one of {_dispatch.HTWA_BACKENDS}, got {backend!r}")
    backend = _dispatch.resolve("htwa_fwd", backend, str(q.device), q.dtype, _CPU_ORDER, _CUDA_ORDER)
    return backend, [list(window), list(shift), list(bias_window), scale]


def _torch_backend(q, k, v, bias_table, backend, params):
    window, shift, bias_window, scale = params
    kwargs = dict(window=tuple(window), shift=tuple(shift), bias_window=tuple(bias_window), scale=scale)
    if backend == "reference":
        from .backends.reference import htwa_reference

        return htwa_reference(q, k, v, bias_table, **kwargs)
    from .backends import torch_attention

    return getattr(torch_attention, f"htwa_{backend}")(q, k, v, bias_table, **kwargs)


def _kernel_bias(bias_table, dtype):
    """The kernels read the bias table in the accumulation dtype (the cast is differentiable)."""
    return None if bias_table is None else bias_table.to(_acc_dtype(dtype))


# --------------------------------------------------------------------------------------------------------------
# public function


def htwa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_table: Optional[Tensor] = None,
    *,
    window,
    shift=(0, 0, 0),
    bias_window=None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Hierarchical temporal window attention over a (frames x rows x columns) token grid.

    Args:
        q, k, v: `(B, T, H, W, heads, D)` in the token-grid layout; any strides with the last dim contiguous, so
            views of a qkv projection (`qkv.view(B, T, H, W, 3, heads, D).unbind(4)`) need no copy. Same dtype
            (float16, bfloat16, float32; float64 on the CPU) and device. D <= 128.
        bias_table: `((2Bt-1)(2Bh-1)(2Bw-1), heads)` learned relative position bias, or None. Any float dtype
            (read in fp32; in fp64 for fp64 inputs); gets a gradient.
        window: `(Wt, Wh, Ww)` (or one int): the window box, each <= the grid size of its axis.
        shift: `(st, sh, sw)`, `0 <= shift < window`: windows start at `shift` along each axis, with a partial
            window `[0, shift)` in front (Swin's cyclic shift with its region mask, as exact exclusion).
        bias_window: `(Bt, Bh, Bw)` >= window, the window the bias table was built for (default: `window`).
            When it differs, in-window token n (flattened frame-major in `window`) is read as token n of
            `bias_window` to pick the bias row: the official code's behaviour when the grid is smaller than the
            configured window (spec 1.3).
        scale: logit scale, default `D ** -0.5`.
        backend: "auto" (C++ on CPU; Triton, then CUDA C++ on GPU), "cpp", "cuda", "triton", "flex", "sdpa" or
            "reference" (plain PyTorch, the official roll + partition + mask path).

    Query (t, h, w) attends key (t', h', w') iff g(t)=g(t'), g(h)=g(h'), g(w)=g(w') per axis with
    g(x) = floor((x - shift) / window). For one axis with length 5, window 2, shift 1 the groups are
    [0 | 1 2 | 3 4], i.e. the 0/1 mask::

        1 0 0 0 0
        0 1 1 0 0
        0 1 1 0 0
        0 0 0 1 1
        0 0 0 1 1

    Grids that do not divide by the window are legal: the edge windows are smaller.

    Returns:
        `(B, T, H, W, heads, D)`, contiguous, dtype of q.
    """
    backend, params = _prepare(q, k, v, bias_table, window, shift, bias_window, scale, backend)
    if backend in _TORCH_BACKENDS:
        return _torch_backend(q, k, v, bias_table, backend, params)
    # The kernels read q, k, v through their strides; only a non-unit last stride forces a copy.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, _ = torch.ops.lfvila.htwa_fwd(q, k, v, _kernel_bias(bias_table, q.dtype), *params, backend)
    return out


def htwa_attention_qkv(
    qkv: Tensor,
    bias_table: Optional[Tensor] = None,
    *,
    window,
    shift=(0, 0, 0),
    bias_window=None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """`htwa_attention` on a packed qkv tensor: `qkv` is `(B, T, H, W, 3, heads, D)` (the qkv projection's output
    viewed so, e.g. `linear(x).view(B, T, H, W, 3, heads, D)`), q, k, v its slices along dim 4. Same result as
    `htwa_attention(*qkv.unbind(4), ...)`; its gradient for `qkv` comes out in one piece, which saves one copy of
    that gradient in the backward (the C++ kernel writes dq, dk, dv straight into it). All other arguments and the
    result as `htwa_attention`."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 7 or qkv.shape[4] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a (B, T, H, W, 3, heads, D) tensor, got {got}")
    q, k, v = qkv.unbind(4)
    backend, params = _prepare(q, k, v, bias_table, window, shift, bias_window, scale, backend)
    if backend in _TORCH_BACKENDS:  # plain-PyTorch paths: autograd through the unbind is all they need
        return _torch_backend(q, k, v, bias_table, backend, params)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    out, _ = torch.ops.lfvila.htwa_fwd_qkv(qkv, _kernel_bias(bias_table, qkv.dtype), *params, backend)
    return out
