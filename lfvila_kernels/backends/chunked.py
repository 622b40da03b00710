"""The "chunked" backend of the fused InfoNCE (`lfvila::info_nce_fwd` / `info_nce_bwd`, contract in losses.py).

Plain torch on any device: a is processed in row panels of R rows, and each panel's logits z_p = s a_p b^T
(R x M, s = 1 / temperature) are one GEMM, so the FLOPs run at the BLAS library's speed (cuBLAS on CUDA)
instead of the Triton kernels' small tiles, while the memory stays O(R x M) scratch instead of N x M:

- forward: lse_row[p] = logsumexp(z_p, 1); the column log-sum-exp (symmetric) is a running logaddexp of each
  panel's logsumexp(z_p, 0), combined in panel order, so the result does not depend on scheduling. The positive
  logit of row i is read off z_p's diagonal at column i + offset: the same number the log-sum-exps saw.
- backward: dz_p = w_r exp(z_p - lse_row_p) + w_c exp(z_p - lse_col) minus the positives' (w_r + w_c), with
  w_r = dloss / N and w_c = dloss / M (symmetric only); da_p = s dz_p @ b and db += s dz_p^T @ a_p, accumulated
  in panel order (deterministic).

Scaling: w_c = w_r N / M, so dz_p = w_r H_p with H_p = P_row + (N / M) P_col in [0, 1 + N / M]. The GEMMs take
H_p and the scalar s w_r multiplies their (R x D, M x D) results; for fp16 inputs this keeps the probabilities
(~1 / N each) out of fp16's subnormal range, where w_r P_row (~1 / N^2 at N = 65536) would flush to zero. The
positives' terms are subtracted afterwards in the accumulation dtype, as in the Triton launcher.

Precision: fp64 inputs accumulate in fp64, the rest in fp32 (lse and loss in that dtype, da/db in the input
dtype). For fp16/bf16 on a device whose torch has GEMMs with fp32 output (`torch.mm(x, y, out_dtype=fp32)`,
torch >= 2.8 on CUDA) the GEMMs read the 16-bit inputs directly and return fp32 logits (never rounded to 16
bits), and the backward casts H_p to the input dtype for its two GEMMs (fp32 accumulation and output), as the
Triton kernel casts its probabilities; elsewhere (the CPU, older torch) the operands are upcast to fp32 (b once,
O(M D), a panel at a time). fp32 inputs follow torch's fp32 matmul setting (`torch.backends.cuda.matmul.
allow_tf32`, off by default: IEEE fp32).

Memory: the live scratch of a panel is at most about 3 R x M accumulation-dtype numbers (the logits, one exp
temporary, H_p); R is the largest multiple of 64 keeping that within PANEL_BUDGET_BYTES (at least 64, at most
N). Besides the outputs, the backward keeps db in the accumulation dtype (M x D, plus one more M x D buffer for
the fp32-output GEMM, which cannot accumulate in place), and the upcast path an fp32 copy of b.

Speed: the GEMMs are a minor part; the time goes to the eager elementwise passes over each fp32 panel (scale,
the log-sum-exps, exp, sums), memory-bound. Measured once on an H200 (torch 2.11, N = M = 65536, D = 1024, bf16,
R = 320): forward 100 ms, forward + backward 251 ms, of which the 4 GEMM sweeps take ~64 ms; the naive loss in
the same run took 70 / 161 ms with 32 GiB of logits, this backend 0.8 GiB. A fused epilogue (one kernel reading
each panel once per direction) is what would close the gap.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ._common import acc_dtype as _acc_dtype
from .cpp import dispatch_has_kernel
from .triton import can_run_triton

__all__ = ["info_nce_fwd_chunked", "info_nce_bwd_chunked", "choose_panel_rows", "PANEL_BUDGET_BYTES", "EPILOGUE"]

# The elementwise work on each fp32 panel: "torch" (eager passes; measured, the default) or "triton" (one pass
# per quantity, triton/info_nce_epilogue.py, with the backward's db from column panels instead of an fp32
# accumulation over row panels: see `_db_from_columns`). "triton" applies to fp32-accumulated inputs where Triton
# runs (CUDA, or the interpreter in tests); it is opt-in until a GPU run has timed it (benchmarks/gpu_losses.py
# times both).
EPILOGUE = "torch"

# Live fp32 scratch per panel (~3 x R x M x 4 bytes). 256 MiB gives R = 320 rows at M = 65536 in fp32: each
# panel's GEMM is then 320 x 65536 x D, large enough to run at full tensor-core speed.
PANEL_BUDGET_BYTES = 256 * 2**20
_PANEL_MULTIPLE = 64
_SCRATCH_COPIES = 3
_HALF = (torch.float16, torch.bfloat16)


def choose_panel_rows(n: int, m: int, acc_dtype: torch.dtype, budget_bytes: Optional[int] = None) -> int:
    """Rows per panel: the largest multiple of 64 whose ~3 x R x m scratch of `acc_dtype` fits `budget_bytes`
    (default PANEL_BUDGET_BYTES, read at call time so tests can shrink it), clamped to [64, n]."""
    budget = PANEL_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per_row = _SCRATCH_COPIES * max(m, 1) * torch.empty((), dtype=acc_dtype).element_size()
    rows = budget // per_row // _PANEL_MULTIPLE * _PANEL_MULTIPLE
    return max(1, min(n, max(_PANEL_MULTIPLE, rows)))


@functools.lru_cache(maxsize=None)
def _has_fp32_out_mm(device_type: str) -> bool:
    """Whether torch.mm(x, y, out_dtype=torch.float32) has a kernel on this device type (for fp16 / bf16 inputs,
    the only ones `_Gemm` passes): the `aten::mm.dtype` overload exists from torch 2.8, with a CUDA kernel (and
    XPU / ROCm ones in later releases) but none for the CPU (2.13). Asked of the dispatcher, as `cpp.has_kernel`
    asks it about the compiled ops, rather than guessed from the version."""
    return "dtype" in torch.ops.aten.mm.overloads() and dispatch_has_kernel("aten::mm.dtype", device_type)


class _Gemm:
    """The products of one call, in the accumulation dtype: 16-bit operands with fp32 output where the device has
    such GEMMs (`low`), else operands upcast to the accumulation dtype (a no-op for fp32 / fp64)."""

    def __init__(self, a: Tensor, b: Tensor, acc: torch.dtype):
        self.acc = acc
        self.low = a.dtype in _HALF and _has_fp32_out_mm(a.device.type)
        self.b = self.operand(b)  # (M, D); the upcast copy, if any, made once

    def operand(self, x: Tensor) -> Tensor:
        return x if self.low or x.dtype == self.acc else x.to(self.acc)

    def mm(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if self.low:
            return torch.mm(x, y, out_dtype=torch.float32, out=out)
        return torch.mm(x, y, out=out)


def _prep(a: Tensor, b: Tensor, temperature: Tensor, offset: int, symmetric: bool):
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    N, M = a.shape[0], b.shape[0]
    if offset < 0 or offset + N > M:
        raise ValueError(f"offset must be in [0, M - N] = [0, {M - N}] (positive of row i at column i + offset), "
                         f"got offset={offset}")
    if symmetric and (N != M or offset != 0):
        raise ValueError(f"symmetric needs N == M and offset == 0, got N={N}, M={M}, offset={offset}")
    acc = _acc_dtype(a.dtype)
    scale = (1.0 / temperature.detach().to(device=a.device, dtype=acc)).reshape(())  # stays on the device
    return a, b, acc, scale


def _rows(n: int, m: int, acc: torch.dtype, panel_rows: Optional[int]) -> int:
    if panel_rows is None:
        return choose_panel_rows(n, m, acc)
    if isinstance(panel_rows, bool) or not isinstance(panel_rows, int) or panel_rows < 1:
        raise ValueError(f"panel_rows must be a positive int or None, got {panel_rows!r}")
    return min(panel_rows, n)


def info_nce_fwd_chunked(a: Tensor, b: Tensor, temperature: Tensor, offset: int, symmetric: bool, *,
                         panel_rows: Optional[int] = None):
    """The `lfvila::info_nce_fwd` contract in row panels: (loss, lse_row, lse_col).

    Args:
        a: `(N, D)`, b: `(M, D)` (same float dtype and device, unit last stride or copied); temperature: 0-dim
            tensor; offset: positive of row i is column i + offset; symmetric: also the column CE (N == M,
            offset 0).
        panel_rows: rows per panel (default: `choose_panel_rows`, from PANEL_BUDGET_BYTES).

    Returns:
        loss `()`, lse_row `(N,)`, lse_col `(M,)` or `(0,)` when not symmetric, all in the accumulation dtype.
    """
    a, b, acc, scale = _prep(a, b, temperature, offset, symmetric)
    N, M = a.shape[0], b.shape[0]
    R = _rows(N, M, acc, panel_rows)
    gemm = _Gemm(a, b, acc)
    lse_of = _lse_fused if _triton_epilogue(a, acc) else _lse_torch
    bt = gemm.b.t()
    lse_row = a.new_empty((N,), dtype=acc)
    pos = a.new_empty((N,), dtype=acc)
    lse_col = None
    for p0 in range(0, N, R):
        p1 = min(p0 + R, N)
        z = gemm.mm(gemm.operand(a[p0:p1]), bt)  # (r, M) unscaled logits of rows p0..p1-1
        row, pos_p, col = lse_of(z, scale, p0 + offset, symmetric)
        lse_row[p0:p1] = row
        pos[p0:p1] = pos_p
        if symmetric:
            lse_col = col if lse_col is None else torch.logaddexp(lse_col, col)
        del z, row, pos_p, col  # before the next panel's GEMM allocates its logits: one panel live at a time
    loss = (lse_row - pos).mean()
    if symmetric:
        loss = loss + (lse_col - pos).mean()
    else:
        lse_col = a.new_empty((0,), dtype=acc)
    return loss, lse_row, lse_col


def info_nce_bwd_chunked(dloss: Tensor, a: Tensor, b: Tensor, temperature: Tensor, lse_row: Tensor,
                         lse_col: Tensor, offset: int, symmetric: bool, *, panel_rows: Optional[int] = None):
    """The `lfvila::info_nce_bwd` contract in row panels: (da, db) in the inputs' dtype.

    Args: as `info_nce_fwd_chunked`, plus dloss (0-dim upstream gradient) and the forward's lse_row / lse_col.
    """
    a, b, acc, scale = _prep(a, b, temperature, offset, symmetric)
    N, M = a.shape[0], b.shape[0]
    R = _rows(N, M, acc, panel_rows)
    gemm = _Gemm(a, b, acc)
    fused = _triton_epilogue(a, acc)
    probs = _probs_fused if fused else _probs_torch
    g = dloss.detach().to(device=a.device, dtype=acc).reshape(())
    unit = g * scale / N  # s w_r: the factor of every H_p product
    w_pos = g * scale * (1.0 / N + 1.0 / M) if symmetric else unit  # s (w_r + w_c) of the positives
    ratio = N / M  # w_c / w_r
    lse_r = lse_row.to(acc).contiguous()
    lse_c = lse_col.to(acc).contiguous() if symmetric else None
    h_dtype = a.dtype if gemm.low else acc  # H_p as the GEMM operand (16 bits on the `low` path)
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    if not fused:  # db summed over the row panels (the Triton path takes it from column panels instead)
        db = torch.zeros((M, b.shape[1]), dtype=acc, device=a.device)  # sum_p H_p^T a_p, scaled after the loop
        db_part = torch.empty_like(db) if gemm.low else None  # the fp32-output GEMM cannot accumulate into db
    for p0 in range(0, N, R):
        p1 = min(p0 + R, N)
        a_p = gemm.operand(a[p0:p1])
        z = gemm.mm(a_p, gemm.b.t())  # unscaled logits; the epilogue applies s and -lse
        h = probs(z, scale, lse_r[p0:p1], lse_c, ratio, h_dtype)
        del z
        da_p = gemm.mm(h, gemm.b).mul_(unit)  # (r, D)
        da_p.sub_(gemm.b[p0 + offset : p1 + offset].to(acc) * w_pos)  # the positives' -1 terms
        da[p0:p1] = da_p
        del da_p
        if not fused:
            if db_part is None:
                db.addmm_(h.t(), a_p)
            else:
                db.add_(gemm.mm(h.t(), a_p, out=db_part))
        del h
    if fused:
        return da, _db_from_columns(a, b, gemm, scale, lse_r, lse_c, ratio, h_dtype, unit, w_pos, offset,
                                    _rows(M, N, acc, panel_rows))
    db.mul_(unit)
    # the positives' -1 terms of db, a panel at a time (an upcast copy of a stays O(R D))
    for p0 in range(0, N, R):
        p1 = min(p0 + R, N)
        db[p0 + offset : p1 + offset].sub_(a[p0:p1].to(acc) * w_pos)
    return da, db.to(b.dtype)


# --------------------------------------------------------------------------------------------------------------
# panel epilogues: "torch" (eager passes) and "triton" (triton/info_nce_epilogue.py), chosen by EPILOGUE


def _triton_epilogue(a: Tensor, acc: torch.dtype) -> bool:
    return EPILOGUE == "triton" and acc == torch.float32 and can_run_triton(a.device, a.dtype)


def _lse_torch(z: Tensor, scale: Tensor, diag: int, symmetric: bool):
    """(row log-sum-exps, positives at column i + diag, column log-sum-exps or None) of scale * z; scales z in
    place."""
    z.mul_(scale)
    return torch.logsumexp(z, 1), z.diagonal(diag), (torch.logsumexp(z, 0) if symmetric else None)


def _lse_fused(z: Tensor, scale: Tensor, diag: int, symmetric: bool):
    """As `_lse_torch`, one Triton pass over z per direction; z is left unscaled."""
    from ..triton import info_nce_epilogue as ep

    s1 = scale.reshape(1)
    return ep.row_lse(z, s1), z.diagonal(diag) * scale, (ep.col_lse(z, s1) if symmetric else None)


def _probs_torch(z: Tensor, scale: Tensor, lse_r: Tensor, lse_c: Optional[Tensor], ratio: float,
                 h_dtype: torch.dtype) -> Tensor:
    """H = exp(s z - lse_r[:, None]) (+ ratio exp(s z - lse_c[None, :])) in h_dtype, with addcmul applying s and
    -lse in one pass; z is consumed (overwritten)."""
    acc = z.dtype
    if lse_c is not None:
        p_row = torch.addcmul(-lse_r[:, None], z, scale).exp_()
        p_col = torch.addcmul(-lse_c[None, :], z, scale, out=z).exp_()
        # H_p = P_row + (N / M) P_col, written straight in the operand dtype (no separate cast pass)
        return torch.add(p_row, p_col, alpha=ratio,
                         out=p_row if h_dtype == acc else z.new_empty(z.shape, dtype=h_dtype))
    p_row = torch.addcmul(-lse_r[:, None], z, scale, out=z)
    return torch.exp(p_row, out=z if h_dtype == acc else z.new_empty(z.shape, dtype=h_dtype))


def _probs_fused(z: Tensor, scale: Tensor, lse_r: Tensor, lse_c: Optional[Tensor], ratio: float,
                 h_dtype: torch.dtype) -> Tensor:
    """As `_probs_torch`, one Triton pass; z is left as it is."""
    from ..triton import info_nce_epilogue as ep

    return ep.probs(z, scale.reshape(1), lse_r, lse_c, ratio, h_dtype)


def _db_from_columns(a, b, gemm: _Gemm, scale, lse_r, lse_c, ratio, h_dtype, unit, w_pos, offset, C):
    """db from column panels of C columns, each block one GEMM written once (the Triton epilogue's backward). The
    row-panel path instead adds every panel's (M, D) fp32 partial of db into an accumulator: at N = M = 65536,
    D = 1024 that is ~1 GB of memory traffic per panel, 205 times, against one extra logits GEMM here."""
    N, M = a.shape[0], b.shape[0]
    a_op = gemm.operand(a)
    db = torch.empty_like(b, memory_format=torch.contiguous_format)
    for q0 in range(0, M, C):
        q1 = min(q0 + C, M)
        z = gemm.mm(a_op, gemm.b[q0:q1].t())  # (N, c): every row of a against these columns
        h = _probs_fused(z, scale, lse_r, None if lse_c is None else lse_c[q0:q1], ratio, h_dtype)
        del z
        db_q = gemm.mm(h.t(), a_op).mul_(unit)  # (c, D)
        del h
        # column j's positive is row j - offset, where that row exists
        i0, i1 = max(q0 - offset, 0), min(q1 - offset, N)
        if i1 > i0:
            db_q[i0 + offset - q0 : i1 + offset - q0].sub_(a[i0:i1].to(db_q.dtype) * w_pos)
        db[q0:q1] = db_q
        del db_q
    return db
