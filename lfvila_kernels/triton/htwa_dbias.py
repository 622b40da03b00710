"""The dbias reductions of the HTWA Triton backward (launched by htwa_launch.py).

dbias without float atomics: the dQ kernel owns, per (chunk, head, query tile), a slice of a dense fp32
workspace PART[chunk, head, n_q, n_k] over in-window indices (N = Wt*Wh*Ww). A chunk is a fixed list of
(batch, box) units that all have the same box CLASS (per axis: the same clipped length and c0; at most 3 per
axis), so a query tile of any unit of the chunk maps to the same in-window rows n_q, and no two programs touch
the same workspace element; one program adds its units' dS in a fixed order (read-modify-write, a barrier
between units). Then the chunks are summed in order (`chunk_sum_kernel`, below) and the dense (head, N, N) is
gathered into the table rows through a cached CSR inverse index built on the host (`dbias_gather_kernel`, below),
also in a fixed order. Bitwise deterministic for a given device (the chunk plan depends on the SM count).
Memory bound: the workspace is n_chunks * heads * N^2 * 4 bytes, with n_chunks <= max(1, 64 MiB /
(heads * N^2 * 4)) + (number of box classes, <= 27): <= 64 MiB + 27 * heads * N^2 * 4 B, independent of B.
For the official LF-VILA shapes at B=16 on a 132-SM H100/H200 it is 7 MiB (layer 0) to 63 MiB (layers 2-4
shifted; layer 5: 2 chunks x 32 heads x 480^2 x 4 B = 56 MiB), plus at most 1/8 of that for the first level of
the chunk sum tree. (The reference materialises B * boxes * heads * N^2 attention weights several times.)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_sum_kernel(PART, OUT, NCHUNK, M, G, BLOCK: tl.constexpr):
    """One level of the ordered chunk reduction: OUT[g, i] = sum of PART[c, i] for c = g*G, g*G + 1, ...,
    min((g+1)*G, NCHUNK) - 1, in that order. PART (NCHUNK, M), OUT (cdiv(NCHUNK, G), M), both contiguous fp32.
    The host repeats it until one row is left: a fixed tree, so the sum is the same bits every run.
    Grid: (cdiv(M, BLOCK), cdiv(NCHUNK, G))."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.program_id(1)
    ok = offs < M
    acc = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    c_lo = g * G
    c_hi = tl.minimum(c_lo + G, NCHUNK)
    ptrs = PART + c_lo.to(tl.int64) * M + offs  # int64: NCHUNK * M may pass 2^31 for large budgets
    for _ in range(c_lo, c_hi):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += M
    tl.store(OUT + g.to(tl.int64) * M + offs, acc, mask=ok)


@triton.jit
def dbias_gather_kernel(DENSE, ROW_PTR, PAIRS, DBIAS, NBIAS, HEADS, NN, MAXCNT,
                         BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """DBIAS[r, head] = sum over the pairs p of row r (CSR: PAIRS[ROW_PTR[r]:ROW_PTR[r+1]], ascending) of
    DENSE[head, p], BLOCK_J pairs at a time (a fixed summation order). DENSE (HEADS, NN) fp32, ROW_PTR int32
    (NBIAS + 1), PAIRS int32 flat n_q * N + n_k, DBIAS (NBIAS, HEADS). Grid: (cdiv(NBIAS, BLOCK_R), HEADS)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    r_ok = rows < NBIAS
    p0 = tl.load(ROW_PTR + rows, mask=r_ok, other=0)
    cnt = tl.load(ROW_PTR + rows + 1, mask=r_ok, other=0) - p0
    acc = tl.zeros([BLOCK_R], dtype=DENSE.dtype.element_ty)
    dense = DENSE + head * NN
    for j0 in range(0, MAXCNT, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ok = r_ok[:, None] & (j[None, :] < cnt[:, None])
        pair = tl.load(PAIRS + p0[:, None] + j[None, :], mask=ok, other=0)
        acc += tl.sum(tl.load(dense + pair, mask=ok, other=0.0), 1)
    tl.store(DBIAS + rows * HEADS + head, acc.to(DBIAS.dtype.element_ty), mask=r_ok)
