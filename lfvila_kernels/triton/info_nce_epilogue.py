"""Triton epilogues of the "chunked" InfoNCE backend (../backends/chunked.py): the elementwise work on one panel
of fp32 logits, each a single pass over the panel instead of torch's several eager passes.

- `row_lse(z, scale)`: logsumexp_j (scale * z_ij) of every row (online max, one read of z).
- `col_lse(z, scale)`: logsumexp_i (scale * z_ij) of every column over the panel's rows (one read of z).
- `probs(z, scale, lse_r, lse_c, ratio, out_dtype)`: H = exp(scale z - lse_r[:, None]) (+ ratio exp(scale z -
  lse_c[None, :]) when lse_c is given), written once in the GEMM operand dtype.

Measured on an H100 (torch 2.11, N = 65536, D = 1024, bf16): the eager passes these replace were most of the
chunked loss's 308 ms against 162 ms for the naive loss; these kernels themselves are not yet timed on a GPU.
Base-2 exponentials with log2(e) folded into the scale. Under the interpreter (CPU tests) everything is fp32/fp64
numpy, so the same kernels are checked against the torch epilogue there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends._common import triton_interpreted as _interpreted

__all__ = ["row_lse", "col_lse", "probs"]


@triton.jit
def _row_lse_kernel(Z, LSE, SCALE, R, C, stride_z, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """LSE[i] = ln 2 * (m_i + log2 sum_j 2^(scale2 z_ij - m_i)), scale2 = SCALE[0] * log2(e) (SCALE a device
    scalar: no host sync per panel). Grid: cdiv(R, BLOCK_R).
    Masked elements load as -1e30, not -inf: a padded row (never stored) then stays finite instead of computing
    -inf - -inf, and in a real row they add 2^(-huge) = 0."""
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    base = Z + rows.to(tl.int64)[:, None] * stride_z
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (cols[None, :] < C)
        x = tl.load(base + cols[None, :], mask=ok, other=-1.0e30).to(tl.float32) * scale2
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + rows, ((m + tl.log2(s)) * 0.6931471805599453).to(LSE.dtype.element_ty), mask=r_ok)


@triton.jit
def _col_lse_kernel(Z, LSE, SCALE, R, C, stride_z, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """LSE[j] over the panel's R rows, the transposed walk of `_row_lse_kernel`. Grid: cdiv(C, BLOCK_C)."""
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows[:, None] < R) & c_ok[None, :]
        x = tl.load(Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=ok,
                    other=-1.0e30).to(tl.float32) * scale2
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), 0)
        m = m_new
    tl.store(LSE + cols, ((m + tl.log2(s)) * 0.6931471805599453).to(LSE.dtype.element_ty), mask=c_ok)


@triton.jit
def _probs_kernel(Z, H, LR, LC, SCALE, R, C, stride_z, stride_h, ratio, SYM: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """H = 2^(scale2 z - log2e lse_r) (+ ratio 2^(scale2 z - log2e lse_c)), scale2 = SCALE[0] * log2(e), stored in
    H's dtype. 2D grid over
    (row tiles, column tiles)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = x * (tl.load(SCALE).to(tl.float32) * 1.4426950408889634)
    lr = tl.load(LR + rows, mask=r_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    h = tl.exp2(x - lr[:, None])
    if SYM:
        lc = tl.load(LC + cols, mask=c_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        h += ratio * tl.exp2(x - lc[None, :])
    tl.store(H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=ok)


def _blocks(kind: str):
    """(BLOCK_R, BLOCK_C). The interpreter runs programs one by one in numpy: few, large ones. On the GPU each
    kernel gets a few hundred programs on a 320 x 65536 panel: 2 rows a program for the row walk, 256 columns a
    program for the column walk, 16 x 512 tiles for the elementwise one."""
    if _interpreted():
        return 64, 1024
    return {"row": (2, 1024), "col": (16, 256), "probs": (16, 512)}[kind]


def _check(z: torch.Tensor):
    if z.dim() != 2 or z.stride(1) != 1 or z.dtype != torch.float32:
        raise ValueError(f"z must be a 2D fp32 panel with unit column stride, got {tuple(z.shape)} {z.dtype} "
                         f"strides {z.stride()}")


def _lse(z: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of scale * z over `dim` (1: the row walk, 0: the column walk) of an (R, C) fp32 panel."""
    _check(z)
    R, C = z.shape
    out = torch.empty(z.shape[1 - dim], dtype=torch.float32, device=z.device)
    kernel, kind = (_row_lse_kernel, "row") if dim == 1 else (_col_lse_kernel, "col")
    br, bc = _blocks(kind)
    grid = triton.cdiv(R, br) if dim == 1 else triton.cdiv(C, bc)
    kernel[(grid,)](z, out, scale, R, C, z.stride(0), BLOCK_R=br, BLOCK_C=bc)
    return out


def row_lse(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, C) fp32 panel -> (R,) fp32 logsumexp of scale * z along the columns; scale a one-element fp32 tensor
    on z's device."""
    return _lse(z, scale, 1)


def col_lse(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, C) fp32 panel -> (C,) fp32 logsumexp of scale * z along the rows (scale as in `row_lse`)."""
    return _lse(z, scale, 0)


def probs(z: torch.Tensor, scale: torch.Tensor, lse_r: torch.Tensor, lse_c, ratio: float,
          out_dtype: torch.dtype) -> torch.Tensor:
    """H = exp(scale z - lse_r[:, None]) + ratio exp(scale z - lse_c[None, :]) (the second term only when lse_c
    is not None), one pass over the (R, C) fp32 panel, returned in `out_dtype`."""
    _check(z)
    R, C = z.shape
    h = torch.empty((R, C), dtype=out_dtype, device=z.device)
    br, bc = _blocks("probs")
    sym = lse_c is not None
    _probs_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
        z, h, lse_r, lse_c if sym else lse_r, scale, R, C, z.stride(0), h.stride(0), float(ratio), SYM=sym,
        BLOCK_R=br, BLOCK_C=bc,
    )
    return h
