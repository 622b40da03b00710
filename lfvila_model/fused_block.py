"""Memory-saving fused pieces of the Swin block: LayerNorm -> Linear, and LayerNorm -> Linear -> GELU -> Linear (and
the same MLP without the LayerNorm, for the BERT layers' feed-forward).

Why: the video encoder's activations are most of a training step's memory. Per token of a block, the plain
modules keep 16 C floats for the backward: the block input x and the mid-block residual x2 (the two LayerNorms'
inputs), both LayerNorm outputs (for the qkv and fc1 weight gradients), qkv (3 C, for the attention), the attention
output (for proj), and the MLP's pre- and post-GELU activations (4 C each). The two autograd Functions here keep
only the LayerNorm *input* (which the plain LayerNorm keeps too), its per-token mean and rstd, and the pre-GELU
activation. The backward recomputes the normalised tokens and the GELU output from them: two elementwise passes
over tensors the backward streams through anyway, and no extra GEMM. 16 C -> 10 C floats a token, the same
numbers (the same ops in the same order; gradients equal to the plain modules' up to summation order).

The MLP backward also writes dL/dh into the buffer of the recomputed GELU output once fc2's weight gradient has
used it: one fewer 4 C allocation, which on a CPU is a fresh mmap that the kernel must fault in page by page.

Under autocast the Functions compute in the dtype autocast gave the projections (recorded in the forward) and
cast the weight gradients back to the parameters' dtypes, as autograd does for the plain modules.

Dropout is not supported inside them: `SwinBlock3D` uses them only when its dropout rate is 0 or it is in eval
mode (the official drop_rate is 0).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["mlp", "norm_linear", "norm_mlp"]


def _layer_norm(x2d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    return torch.native_layer_norm(x2d, (x2d.shape[-1],), weight, bias, eps)


def _normed(ctx, x2d: Tensor, ln_w, ln_b) -> Tensor:
    """The forward's LayerNorm output again, in the compute dtype (x2d itself when there is no LayerNorm)."""
    y = _layer_norm(x2d, ln_w, ln_b, ctx.eps)[0] if ctx.eps is not None else x2d
    return y.to(ctx.dtype)


def _input_grads(ctx, dy: Tensor, x2d: Tensor, mean, rstd, ln_w, ln_b):
    """(dx in x's shape, dln_w, dln_b) from the gradient of the LayerNorm output (of x itself without one)."""
    need = ctx.needs_input_grad
    if ctx.eps is None:
        return _shaped(dy.to(x2d.dtype), ctx.x_shape), None, None
    dx, dln_w, dln_b = torch.ops.aten.native_layer_norm_backward(
        dy.to(x2d.dtype), x2d, (x2d.shape[-1],), mean, rstd, ln_w, ln_b,
        [need[0], ln_w is not None and need[1], ln_b is not None and need[2]],
    )
    return _shaped(dx, ctx.x_shape), dln_w, dln_b


def _linear_grads(dout: Tensor, inp: Tensor, weight: Tensor, bias: Optional[Tensor], need_w: bool, need_b: bool):
    """Weight and bias gradients of `inp @ weight.T + bias` in the compute dtype, cast to the parameters' dtypes."""
    dw = (dout.t() @ inp).to(weight.dtype) if need_w else None
    db = dout.sum(0).to(bias.dtype) if (need_b and bias is not None) else None
    return dw, db


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w, b):
        x2d = x.reshape(-1, x.shape[-1])
        y, mean, rstd = _layer_norm(x2d, ln_w, ln_b, eps)
        out = F.linear(y, w, b)  # under autocast: cast to the autocast dtype here
        ctx.eps, ctx.dtype, ctx.x_shape = eps, out.dtype, x.shape
        ctx.save_for_backward(x2d, ln_w, ln_b, mean, rstd, w, b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2d, ln_w, ln_b, mean, rstd, w, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dout = dout.reshape(-1, dout.shape[-1]).to(ctx.dtype)
        dw, db = _linear_grads(dout, _normed(ctx, x2d, ln_w, ln_b), w, b, need[4], need[5])
        dx = dln_w = dln_b = None
        if any(need[:3]):
            dx, dln_w, dln_b = _input_grads(ctx, dout @ w.to(ctx.dtype), x2d, mean, rstd, ln_w, ln_b)
        return dx, dln_w, dln_b, None, dw, db


class _NormMlp(torch.autograd.Function):
    """eps None: no LayerNorm (`mlp`); ln_w, ln_b, mean and rstd are then None."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2):
        x2d = x.reshape(-1, x.shape[-1])
        y, mean, rstd = _layer_norm(x2d, ln_w, ln_b, eps) if eps is not None else (x2d, None, None)
        h = F.linear(y, w1, b1)
        del y
        out = F.linear(F.gelu(h), w2, b2)
        ctx.eps, ctx.dtype, ctx.x_shape = eps, out.dtype, x.shape
        ctx.save_for_backward(x2d, ln_w, ln_b, mean, rstd, h, w1, b1, w2, b2)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2d, ln_w, ln_b, mean, rstd, h, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dt = ctx.dtype
        dout = dout.reshape(-1, dout.shape[-1]).to(dt)
        g = F.gelu(h)  # h is in the compute dtype (fc1's output), so g is too
        dw2, db2 = _linear_grads(dout, g, w2, b2, need[6], need[7])
        dg = dout @ w2.to(dt)
        # dL/dh overwrites the recomputed GELU output, which is no longer needed: no fresh 4C buffer.
        dh = torch.ops.aten.gelu_backward.grad_input(dg, h, grad_input=g)
        del dg
        dw1, db1 = _linear_grads(dh, _normed(ctx, x2d, ln_w, ln_b), w1, b1, need[4], need[5])
        dx = dln_w = dln_b = None
        if any(need[:3]):
            dy = dh @ w1.to(dt)
            del dh
            dx, dln_w, dln_b = _input_grads(ctx, dy, x2d, mean, rstd, ln_w, ln_b)
        return dx, dln_w, dln_b, None, dw1, db1, dw2, db2


def _shaped(dx: Optional[Tensor], shape) -> Optional[Tensor]:
    return None if dx is None else dx.view(shape)


def norm_linear(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> Tensor:
    """`linear(norm(x))`, keeping only x and the LayerNorm statistics for the backward.

    Args:
        x: `(..., C)`.
        norm: LayerNorm over C (elementwise affine or not).
        linear: Linear with in_features C.
    Returns:
        `(..., linear.out_features)`.
    """
    _check(x, norm, linear.in_features, "linear")
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def norm_mlp(x: Tensor, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> Tensor:
    """`fc2(gelu(fc1(norm(x))))` (exact erf GELU), keeping only x, the LayerNorm statistics and `fc1`'s output for
    the backward.

    Args:
        x: `(..., C)`.
        norm: LayerNorm over C.
        fc1: Linear C -> hidden; fc2: Linear hidden -> C_out.
    Returns:
        `(..., fc2.out_features)`.
    """
    _check(x, norm, fc1.in_features, "fc1")
    _check_mlp(fc1, fc2)
    return _NormMlp.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def mlp(x: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> Tensor:
    """`fc2(gelu(fc1(x)))` (exact erf GELU), keeping only x and `fc1`'s output for the backward (the GELU output
    is recomputed): the feed-forward of the BERT layers (`text_encoder.BertLayerFused`).

    Args:
        x: `(..., C)`.
        fc1: Linear C -> hidden; fc2: Linear hidden -> C_out.
    Returns:
        `(..., fc2.out_features)`.
    """
    if x.shape[-1] != fc1.in_features:
        raise ValueError(f"x's last axis ({x.shape[-1]}) must equal fc1.in_features ({fc1.in_features})")
    _check_mlp(fc1, fc2)
    return _NormMlp.apply(x, None, None, None, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def _check(x: Tensor, norm: torch.nn.LayerNorm, in_features: int, name: str) -> None:
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"norm must normalise the last axis only, got normalized_shape={tuple(norm.normalized_shape)}")
    C = norm.normalized_shape[0]
    if x.shape[-1] != C or in_features != C:
        raise ValueError(
            f"x's last axis ({x.shape[-1]}), norm.normalized_shape ({C}) and {name}.in_features ({in_features}) "
            f"must be equal"
        )


def _check_mlp(fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> None:
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"fc2.in_features={fc2.in_features} must equal fc1.out_features={fc1.out_features}")
