"""Triton kernels of the fused InfoNCE (`lfvila::info_nce_fwd` / `info_nce_bwd`, contract in ../losses.py).

Two kernels, each used twice with the roles of a and b swapped:

- `_lse_kernel(X, Y)`: lse_i = logsumexp_j (s * x_i . y_j) for a block of rows of X, streaming Y in column
  tiles with an online max (flash-attention style). Row LSE = `_lse_kernel(a, b)`; the column LSE of
  z = s a b^T is the row LSE of z^T = s b a^T, i.e. `_lse_kernel(b, a)`.
- `_grad_kernel(X, Y)`: dX_i = s * sum_j [w_x exp(z_ij - lse_x_i) + w_y exp(z_ij - lse_y_j)] y_j, the softmax
  part of dL/dx_i from the row CE (weight w_x) and the column CE (weight w_y) at once. da = grad(a, b) with
  (w_x, w_y) = (w_row, w_col); db = grad(b, a) with the weights (and LSEs) swapped. The positives' -1 terms are
  O(N D) and are subtracted by the launcher.

Memory: O(N) LSE vectors plus the outputs; the logits exist only as (BLOCK_M, BLOCK_N) register tiles. The
grad kernel's grid also splits D into BLOCK_DV chunks (the dX accumulator must fit in registers): each chunk
recomputes z over the full D, the price of never writing z to memory.

Precision: under the interpreter (CPU), fp16/bf16 are upcast to fp32 right after `tl.load` (numpy has no bf16);
on the GPU the dots run in the input dtype with fp32 accumulation (fp32 inputs use IEEE fp32 dots, not tf32).
Offsets are int64 (rows * stride can exceed 2^31 for N = 65536, D = 1024 only in bytes, but stay safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends._common import acc_dtype as _acc_dtype, triton_interpreted


@triton.jit
def _lse_kernel(
    X, Y, LSE, PARAMS,  # X (n_x, D), Y (n_y, D) with unit last stride; LSE (n_x,) acc dtype; PARAMS [s] fp32/fp64
    n_x, n_y, D, stride_x, stride_y,
    ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_x
    scale = tl.load(PARAMS).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    x_base = X + rows.to(tl.int64)[:, None] * stride_x
    for n0 in range(0, n_y, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_y
        y_base = Y + cols.to(tl.int64)[:, None] * stride_y
        z = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            x = tl.load(x_base + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            y = tl.load(y_base + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                x = x.to(ACC)
                y = y.to(ACC)
            if IEEE:
                z += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=ACC)
            else:
                z += tl.dot(x, tl.trans(y), out_dtype=ACC)
        z = tl.where(cmask[None, :], z * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + rows, m + tl.log(l), mask=rmask)


@triton.jit
def _grad_kernel(
    X, Y, LSE_X, LSE_Y, DX, PARAMS,  # PARAMS [s, w_x, w_y]; DX (n_x, D) contiguous, acc dtype
    n_x, n_y, D, stride_x, stride_y,
    HAS_X: tl.constexpr, HAS_Y: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_x
    scale = tl.load(PARAMS).to(ACC)
    w_x = tl.load(PARAMS + 1).to(ACC)
    w_y = tl.load(PARAMS + 2).to(ACC)
    if HAS_X:
        lse_x = tl.load(LSE_X + rows, mask=rmask, other=0.0).to(ACC)
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dvmask = dv < D
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    x_base = X + rows.to(tl.int64)[:, None] * stride_x
    for n0 in range(0, n_y, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_y
        y_base = Y + cols.to(tl.int64)[:, None] * stride_y
        z = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            x = tl.load(x_base + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            y = tl.load(y_base + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                x = x.to(ACC)
                y = y.to(ACC)
            if IEEE:
                z += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=ACC)
            else:
                z += tl.dot(x, tl.trans(y), out_dtype=ACC)
        z = z * scale
        g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if HAS_X:
            g += w_x * tl.exp(z - lse_x[:, None])
        if HAS_Y:
            lse_y = tl.load(LSE_Y + cols, mask=cmask, other=0.0).to(ACC)
            g += w_y * tl.exp(z - lse_y[None, :])
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        yv = tl.load(y_base + dv[None, :], mask=cmask[:, None] & dvmask[None, :], other=0.0)
        if UPCAST:
            yv = yv.to(ACC)
            if IEEE:
                acc += tl.dot(g, yv, input_precision="ieee", out_dtype=ACC)
            else:
                acc += tl.dot(g, yv, out_dtype=ACC)
        else:
            if IEEE:
                acc += tl.dot(g, yv, input_precision="ieee", out_dtype=ACC)
            else:
                # fp16/bf16 on the GPU: probabilities in the input dtype (tensor-core dot, fp32 accumulation)
                acc += tl.dot(g.to(yv.dtype), yv, out_dtype=ACC)
    acc = acc * scale
    out = DX + rows.to(tl.int64)[:, None] * D + dv[None, :]
    tl.store(out, acc, mask=rmask[:, None] & dvmask[None, :])


def _config(device: torch.device, D: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps, num_stages): one config (the interpreter runs any block
    size; small blocks keep its numpy work small)."""
    if device.type == "cpu":
        return 32, 32, 32, max(16, min(64, triton.next_power_of_2(D))), 1, 1
    return 64, 64, 64, min(256, max(16, triton.next_power_of_2(D))), 8, 2


def _flags(dtype: torch.dtype, device: torch.device):
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = triton_interpreted() or dtype in (torch.float32, torch.float64)
    ieee = dtype in (torch.float32, torch.float64)
    return acc, upcast, ieee


def _lse(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    n_x, D = x.shape
    lse = torch.empty((n_x,), dtype=_acc_dtype(x.dtype), device=x.device)
    bm, bn, bd, _, warps, stages = _config(x.device, D)
    acc, upcast, ieee = _flags(x.dtype, x.device)
    _lse_kernel[(triton.cdiv(n_x, bm),)](
        x, y, lse, params, n_x, y.shape[0], D, x.stride(0), y.stride(0),
        ACC=acc, UPCAST=upcast, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return lse


def _grad(x, y, lse_x, lse_y, params) -> torch.Tensor:
    n_x, D = x.shape
    dx = torch.empty((n_x, D), dtype=_acc_dtype(x.dtype), device=x.device)
    bm, bn, bd, bdv, warps, stages = _config(x.device, D)
    acc, upcast, ieee = _flags(x.dtype, x.device)
    dummy = params  # never read when the matching HAS_* flag is off
    _grad_kernel[(triton.cdiv(n_x, bm), triton.cdiv(D, bdv))](
        x, y, dummy if lse_x is None else lse_x, dummy if lse_y is None else lse_y, dx, params,
        n_x, y.shape[0], D, x.stride(0), y.stride(0),
        HAS_X=lse_x is not None, HAS_Y=lse_y is not None, ACC=acc, UPCAST=upcast, IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=warps, num_stages=stages,
    )
    return dx


def _prep(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor):
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    acc = _acc_dtype(a.dtype)
    scale = (1.0 / temperature.detach().to(device=a.device, dtype=acc)).reshape(1)  # stays on the device: no sync
    return a, b, acc, scale


def info_nce_fwd_triton(a, b, temperature, offset: int, symmetric: bool):
    """The `lfvila::info_nce_fwd` contract on CUDA (or the CPU interpreter): (loss, lse_row, lse_col)."""
    a, b, acc, scale = _prep(a, b, temperature)
    N = a.shape[0]
    lse_row = _lse(a, b, scale)
    lse_col = _lse(b, a, scale) if symmetric else a.new_empty((0,), dtype=acc)
    # positive logits z_{i, i+offset}: O(N D) in plain torch
    pos = (a.to(acc) * b[offset : offset + N].to(acc)).sum(1) * scale
    loss = (lse_row - pos).mean()
    if symmetric:
        loss = loss + (lse_col - pos).mean()
    return loss, lse_row, lse_col


def info_nce_bwd_triton(dloss, a, b, temperature, lse_row, lse_col, offset: int, symmetric: bool):
    """The `lfvila::info_nce_bwd` contract on CUDA (or the CPU interpreter): (da, db)."""
    a, b, acc, scale = _prep(a, b, temperature)
    N, M = a.shape[0], b.shape[0]
    g = dloss.detach().to(device=a.device, dtype=acc).reshape(1)
    w_r = g / N
    w_c = g / M if symmetric else torch.zeros_like(g)
    lc = lse_col if symmetric else None
    da = _grad(a, b, lse_row, lc, torch.cat([scale, w_r, w_c]))
    db = _grad(b, a, lc, lse_row, torch.cat([scale, w_c, w_r]))
    # the positives' -1 terms: dz_{i,i+offset} gets -(w_r + w_c)
    w = (w_r + w_c) * scale
    da -= w * b[offset : offset + N].to(acc)
    db[offset : offset + N] -= w * a.to(acc)
    return da.to(a.dtype), db.to(b.dtype)
