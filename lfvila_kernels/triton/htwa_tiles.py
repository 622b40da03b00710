"""The HTWA Triton kernels on per-class bias tiles (the default Triton path; launched by htwa_launch.py; contract:
csrc/HTWA_CONTRACT.md; design notes and what a GPU run must check: docs/kernels-gpu-plan.md).

Bias tiles. Boxes with the same extent and first in-window coordinates along every axis form a CLASS (at most
27, 1-9 on the official shapes; lfvila_kernels/geometry.py). The launcher gathers the bias table once per call into
TILE (heads, n_classes, NP, NP) fp32, indexed by BOX-LOCAL token positions (i = (it*lh + ih)*lw + iw):
TILE[h, c, i, j] = log2(e) * bias[row(n_i, n_j), h] for tokens of the box, 0 for a padded query row and -inf for
a padded key (the region mask). So a kernel adds one contiguous, L2-resident tile where the per-window kernels
(htwa_fwd.py, htwa_bwd.py: TUNE["legacy_kernels"]) gathered table rows through an index per (query, key) pair.
NP is the window's token count rounded up to the largest tile size of the call, so tile loads need no mask.

dbias without read-modify-write. A chunk is a list of (batch, box) units of one class; a program owns one
(chunk, query tile x key tile, head), sums dS over its units in registers and stores the sum once into
PART (heads, n_chunks, NP, NP) (this program is its only writer). htwa_dbias.dbias_gather_kernel then reduces
PART into table rows through a CSR index over (chunk, i, j) built on the host, in a fixed order: bitwise
deterministic. Windows that fit one tile (<= 64 tokens: layers 0-1) take a one-kernel backward that computes P and
dS once per unit and gives dq, dk, dv and the dS sum; larger windows run dQ (+ delta), dK/dV and the dS-sum kernel
(which recomputes P and dS of its tile pair: two more products per pair than a fused update, the price of no
workspace traffic in the dQ loop).

Scheduling: grids are (tiles of all boxes, B, heads), head slowest, so programs resident together read the tiles
of one head. Softmax in base 2 as in htwa_fwd.py.

Offsets: the batch and head parts of a token's offset go on the scalar base pointer in int64; the in-batch part
t*st + h*sh + w*sw is int32 unless the launcher sets OFF64 (an in-batch offset could pass 2^31: a grid of
> 5.5M tokens at LF-VILA's token stride 3*heads*D = 384). An address tile then costs one register an element,
not two: at 64 x 64 tiles that removed every spill ptxas reported on sm_90 (docs/kernels-gpu-plan.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .htwa_geometry import window_box, decode_token, token_offset


@triton.jit
def bias_tile_base(TILE, BOX_CLS, box, head, NCLS, NP):
    """Start of the (NP, NP) bias tile of the box's class for this head (int64 element offset)."""
    cls = tl.load(BOX_CLS + box)
    return TILE + (head * NCLS + cls).to(tl.int64) * NP * NP


@triton.jit
def in_batch_offset(tt, hh, ww, st, sh, sw, OFF64: tl.constexpr):
    """Element offsets of tokens (tt, hh, ww) inside one (batch, head) slice: int32 unless OFF64 (the launcher
    sets it when an in-batch offset can pass 2^31), so that a tile's addresses take one register an element."""
    if OFF64:
        return token_offset(tt, hh, ww, st, sh, sw)
    return tt.to(tl.int32) * st + hh.to(tl.int32) * sh + ww.to(tl.int32) * sw


@triton.jit
def row_ptrs(X, b, head, tt, hh, ww, sb, sn, st, sh, sw, OFF64: tl.constexpr):
    """Pointers to tokens (tt, hh, ww) of batch b and head `head` of X (B, T, H, W, heads[, ...]): the batch and
    head part in int64 on the scalar base, the in-batch part through `in_batch_offset`."""
    return (X + (b.to(tl.int64) * sb + head * sn)) + in_batch_offset(tt, hh, ww, st, sh, sw, OFF64)


@triton.jit
def tile_ptrs(X, b, head, tt, hh, ww, sb, sn, st, sh, sw, offs_d, OFF64: tl.constexpr):
    """(rows, BLOCK_D) pointers: `row_ptrs` plus the feature index (unit stride)."""
    return (X + (b.to(tl.int64) * sb + head * sn)) + (in_batch_offset(tt, hh, ww, st, sh, sw, OFF64)[:, None]
                                                      + offs_d[None, :])


@triton.jit
def htwa_fwd_tiles_kernel(
    Q, K, V, TILE, BOX_CLS, OUT, LSE,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    T, H, W, D: tl.constexpr, OT, OH, OW, NBH, NBW, N_TILES, NCLS, NP, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (box, query tile) x batch x head: online-softmax attention over the box's key tiles.

    Q, K, V, OUT (B, T, H, W, heads, D), unit last stride (s?b, s?t, s?h, s?w, s?n in elements); LSE
    (B, T, H, W, heads) fp32/fp64 (sl*); TILE (heads, NCLS, NP, NP) fp32 log2-scaled bias tiles with the key mask,
    BOX_CLS int32 class of each box (both unused without a bias). T, H, W grid; OT/OH/OW window origins; NBH, NBW
    boxes along h, w; N_TILES query tiles per box; qk_scale = scale * log2(e). WT runtime, WH/WW constexpr (the
    official layers differ only in WT). Grid: (boxes * N_TILES, B, heads)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    box = pid // N_TILES
    tile = pid % N_TILES
    t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_M >= nb:
        return
    ACC = LSE.dtype.element_ty
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tq, hq, wq, _, _ = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
    q = tl.load(tile_ptrs(Q, b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw, offs_d, OFF64),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + (b.to(tl.int64) * skb + head * skn)
    v_base = V + (b.to(tl.int64) * svb + head * svn)
    if HAS_BIAS:
        tile_q = bias_tile_base(TILE, BOX_CLS, box, head, NCLS, NP)
        row_q = offs_m * NP

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, nb, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nb
        tk, hk, wk, _, _ = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (in_batch_offset(tk, hk, wk, skt, skh, skw, OFF64)[:, None] + offs_d[None, :]),
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + (in_batch_offset(tk, hk, wk, svt, svh, svw, OFF64)[:, None] + offs_d[None, :]),
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:  # the tile holds -inf at padded keys: no mask here
            s += tl.load(tile_q + (row_q[:, None] + offs_n[None, :])).to(ACC)
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        # every key tile holds >= 1 real key, so m_new is finite and no row computes inf - inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC).to(ACC)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(tile_ptrs(OUT, b, head, tq, hq, wq, sob, son, sot, soh, sow, offs_d, OFF64),
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(row_ptrs(LSE, b, head, tq, hq, wq, slb, sln, slt, slh, slw, OFF64), lse, mask=m_ok)


@triton.jit
def htwa_bwd_dq_tiles_kernel(
    Q, K, V, TILE, BOX_CLS, OUT, DOUT, LSE, DELTA, DQ,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, D: tl.constexpr, OT, OH, OW, NBH, NBW, N_TILES, NCLS, NP, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (box, query tile) x batch x head: delta = <dO, O> of its rows (stored once, for the dK/dV and dS-sum
    kernels) and dQ = scale dS K. OUT, DOUT strides so*, LSE, DELTA sl*, DQ sg*; the rest as the forward.
    Grid: (boxes * N_TILES, B, heads)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    box = pid // N_TILES
    tile = pid % N_TILES
    t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_M >= nb:
        return
    ACC = LSE.dtype.element_ty
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    tq, hq, wq, _, _ = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
    o_off = (b.to(tl.int64) * sob + head * son)
    o_rel = in_batch_offset(tq, hq, wq, sot, soh, sow, OFF64)[:, None] + offs_d[None, :]
    l_ptr = (b.to(tl.int64) * slb + head * sln) + in_batch_offset(tq, hq, wq, slt, slh, slw, OFF64)
    q = tl.load(tile_ptrs(Q, b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw, offs_d, OFF64),
                mask=md, other=0.0)
    do = tl.load((DOUT + o_off) + o_rel, mask=md, other=0.0)
    o = tl.load((OUT + o_off) + o_rel, mask=md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    tl.store(DELTA + l_ptr, delta, mask=m_ok)
    lse2 = tl.load(LSE + l_ptr, mask=m_ok, other=0.0) * 1.4426950408889634
    k_base = K + (b.to(tl.int64) * skb + head * skn)
    v_base = V + (b.to(tl.int64) * svb + head * svn)
    if HAS_BIAS:
        tile_q = bias_tile_base(TILE, BOX_CLS, box, head, NCLS, NP)
        row_q = offs_m * NP
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, nb, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nb
        tk, hk, wk, _, _ = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (in_batch_offset(tk, hk, wk, skt, skh, skw, OFF64)[:, None] + offs_d[None, :]),
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + (in_batch_offset(tk, hk, wk, svt, svh, svw, OFF64)[:, None] + offs_d[None, :]),
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:
            s += tl.load(tile_q + (row_q[:, None] + offs_n[None, :])).to(ACC)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC)
    tl.store(tile_ptrs(DQ, b, head, tq, hq, wq, sgb, sgn, sgt, sgh, sgw, offs_d, OFF64),
             (dq * scale).to(DQ.dtype.element_ty), mask=md)


@triton.jit
def htwa_bwd_dkdv_tiles_kernel(
    Q, K, V, TILE, BOX_CLS, DOUT, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, D: tl.constexpr, OT, OH, OW, NBH, NBW, N_TILES, NCLS, NP, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (box, key tile) x batch x head: dK = scale dS^T Q, dV = P^T dO over the box's query tiles, in the
    transposed orientation (S^T = K Q^T; the bias tile read transposed), no atomics. DELTA from the dQ kernel.
    Strides as the dQ kernel (DK, DV sg*). Grid: (boxes * N_TILES, B, heads), N_TILES key tiles."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    box = pid // N_TILES
    tile = pid % N_TILES
    t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_N >= nb:
        return
    ACC = LSE.dtype.element_ty
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd = n_ok[:, None] & d_ok[None, :]
    tk, hk, wk, _, _ = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
    k = tl.load(tile_ptrs(K, b, head, tk, hk, wk, skb, skn, skt, skh, skw, offs_d, OFF64),
                mask=nd, other=0.0)
    v = tl.load(tile_ptrs(V, b, head, tk, hk, wk, svb, svn, svt, svh, svw, offs_d, OFF64),
                mask=nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + (b.to(tl.int64) * sqb + head * sqn)
    o_base = DOUT + (b.to(tl.int64) * sob + head * son)
    l_base = b.to(tl.int64) * slb + head * sln
    if HAS_BIAS:
        tile_k = bias_tile_base(TILE, BOX_CLS, box, head, NCLS, NP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, nb, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < nb
        md = m_ok[:, None] & d_ok[None, :]
        tq, hq, wq, _, _ = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        q = tl.load(q_base + (in_batch_offset(tq, hq, wq, sqt, sqh, sqw, OFF64)[:, None] + offs_d[None, :]), mask=md,
                    other=0.0)
        do = tl.load(o_base + (in_batch_offset(tq, hq, wq, sot, soh, sow, OFF64)[:, None] + offs_d[None, :]), mask=md,
                     other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        l_off = l_base + in_batch_offset(tq, hq, wq, slt, slh, slw, OFF64)
        lse2 = tl.load(LSE + l_off, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC).to(ACC) * qk_scale  # (keys, queries)
        if HAS_BIAS:
            st += tl.load(tile_k + (offs_n[:, None] + offs_m[None, :] * NP)).to(ACC)
        pt = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC).to(ACC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC).to(ACC)
    tl.store(tile_ptrs(DK, b, head, tk, hk, wk, sgb, sgn, sgt, sgh, sgw, offs_d, OFF64),
             (dk * scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(tile_ptrs(DV, b, head, tk, hk, wk, sgb, sgn, sgt, sgh, sgw, offs_d, OFF64), dv.to(DV.dtype.element_ty),
             mask=nd)


@triton.jit
def htwa_bwd_dssum_tiles_kernel(
    Q, K, V, TILE, BOX_CLS, DOUT, LSE, DELTA, PART, UNITS, CHUNK_PTR,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    T, H, W, D: tl.constexpr, OT, OH, OW, NBOX, NBH, NBW, N_TILES, NCLS, NP, N_CHUNKS, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dS summed over a chunk's units, for one (query tile, key tile) pair and head, in registers; one plain store
    into PART[head, chunk] (heads, N_CHUNKS, NP, NP) fp32. UNITS int32 b * NBOX + box grouped by chunk,
    CHUNK_PTR int32 (N_CHUNKS + 1) offsets into UNITS; a chunk's units share one class, so box-local (i, j) mean
    the same table row for all of them (the reduction's CSR index maps them). P and dS are recomputed from
    Q, K, V, dO, LSE and DELTA (the dQ kernel's). Strides as the dQ kernel. Grid: (N_CHUNKS, N_TILES^2, heads)."""
    chunk = tl.program_id(0)
    pair = tl.program_id(1)
    head = tl.program_id(2)
    ACC = LSE.dtype.element_ty
    offs_m = (pair // N_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pair % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    u_lo = tl.load(CHUNK_PTR + chunk)
    u_hi = tl.load(CHUNK_PTR + chunk + 1)
    tile = bias_tile_base(TILE, BOX_CLS, tl.load(UNITS + u_lo) % NBOX, head, NCLS, NP)
    tile_off = offs_m[:, None] * NP + offs_n[None, :]  # int32; the tile is re-read per unit from L1/L2
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for ui in range(u_lo, u_hi):
        unit = tl.load(UNITS + ui)
        b = unit // NBOX
        box = unit % NBOX
        t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        m_ok = offs_m < nb
        n_ok = offs_n < nb
        md = m_ok[:, None] & d_ok[None, :]
        nd = n_ok[:, None] & d_ok[None, :]
        tq, hq, wq, _, _ = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        tk, hk, wk, _, _ = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        bb = b.to(tl.int64)
        q = tl.load((Q + (bb * sqb + head * sqn)) + (in_batch_offset(tq, hq, wq, sqt, sqh, sqw, OFF64)[:, None]
                    + offs_d[None, :]), mask=md, other=0.0)
        do = tl.load((DOUT + (bb * sob + head * son)) + (in_batch_offset(tq, hq, wq, sot, soh, sow, OFF64)[:, None]
                     + offs_d[None, :]), mask=md, other=0.0)
        k = tl.load((K + (bb * skb + head * skn)) + (in_batch_offset(tk, hk, wk, skt, skh, skw, OFF64)[:, None]
                    + offs_d[None, :]), mask=nd, other=0.0)
        v = tl.load((V + (bb * svb + head * svn)) + (in_batch_offset(tk, hk, wk, svt, svh, svw, OFF64)[:, None]
                    + offs_d[None, :]), mask=nd, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        l_ptr = (b.to(tl.int64) * slb + head * sln) + in_batch_offset(tq, hq, wq, slt, slh, slw, OFF64)
        lse2 = tl.load(LSE + l_ptr, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_ptr, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale + tl.load(tile + tile_off).to(ACC)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds_sum += p * (dp - delta[:, None])
    part = PART + (head * N_CHUNKS + chunk).to(tl.int64) * NP * NP
    tl.store(part + offs_m[:, None] * NP + offs_n[None, :], ds_sum.to(PART.dtype.element_ty))


@triton.jit
def htwa_bwd_one_tile_kernel(
    Q, K, V, TILE, BOX_CLS, OUT, DOUT, LSE, DQ, DK, DV, PART, UNITS, CHUNK_PTR,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, D: tl.constexpr, OT, OH, OW, NBOX, NBH, NBW, NCLS, N_CHUNKS, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
    BLOCK: tl.constexpr, WB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole backward of windows of <= WB tokens, BLOCK // WB of them packed into one BLOCK x BLOCK tile
    (rows and columns s*WB .. s*WB + WB - 1 belong to the s-th unit of the step; the products are block-diagonal:
    the mask, and the bias tile's -inf off the diagonal blocks, keep the units apart), so that the tensor cores
    see BLOCK-row products where one 30-token window would give 32. One (chunk, head) per program: per step of
    BLOCK // WB units (batch, box) of the chunk, in order, delta, P and dS once, then dQ = scale dS K,
    dK = scale dS^T Q, dV = P^T dO; dS summed over the steps in registers and stored once into PART[head, chunk]
    (HAS_BIAS). The chunk's units share one class, hence one (packed) bias tile, NP = BLOCK.
    Strides as the dQ kernel, but OFF64 here means that some element offset of a whole tensor (batch included) can
    pass 2^31: the rows of a step come from different samples, so the batch offset is per row, and int32 offsets
    keep the 64 x 64 tile from spilling. Grid: (N_CHUNKS, heads)."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    ACC = LSE.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    slot = offs // WB  # which unit of the step a row / column belongs to
    local = offs % WB  # its box-local token index
    same = slot[:, None] == slot[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    u_lo = tl.load(CHUNK_PTR + chunk)
    u_hi = tl.load(CHUNK_PTR + chunk + 1)
    if HAS_BIAS:
        tile = bias_tile_base(TILE, BOX_CLS, tl.load(UNITS + u_lo) % NBOX, head, NCLS, BLOCK)
    ds_sum = tl.zeros([BLOCK, BLOCK], dtype=ACC)
    for ui in range(u_lo, u_hi, BLOCK // WB):
        in_chunk = ui + slot < u_hi  # the chunk's last step may hold fewer units
        unit = tl.load(UNITS + ui + slot, mask=in_chunk, other=0)
        b = unit // NBOX
        if OFF64:  # here: a whole-tensor offset could pass 2^31 (launcher), else all offsets are int32
            b = b.to(tl.int64)
        t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(unit % NBOX, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        ok = in_chunk & (local < nb)
        md = ok[:, None] & d_ok[None, :]
        tt, hh, ww, _, _ = decode_token(local, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, WH, WW)
        q = tl.load(Q + ((b * sqb + head * sqn + in_batch_offset(tt, hh, ww, sqt, sqh, sqw, OFF64))[:, None]
                         + offs_d[None, :]), mask=md, other=0.0)
        k = tl.load(K + ((b * skb + head * skn + in_batch_offset(tt, hh, ww, skt, skh, skw, OFF64))[:, None]
                         + offs_d[None, :]), mask=md, other=0.0)
        v = tl.load(V + ((b * svb + head * svn + in_batch_offset(tt, hh, ww, svt, svh, svw, OFF64))[:, None]
                         + offs_d[None, :]), mask=md, other=0.0)
        o_off = (b * sob + head * son + in_batch_offset(tt, hh, ww, sot, soh, sow, OFF64))[:, None] + offs_d[None, :]
        do = tl.load(DOUT + o_off, mask=md, other=0.0)
        o = tl.load(OUT + o_off, mask=md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + (b * slb + head * sln + in_batch_offset(tt, hh, ww, slt, slh, slw, OFF64)), mask=ok,
                       other=0.0) * 1.4426950408889634
        delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:  # re-read per step (L1/L2) rather than held in registers across the loop
            s += tl.load(tile + (offs[:, None] * BLOCK + offs[None, :])).to(ACC)
        p = tl.where(ok[:, None] & ok[None, :] & same, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC).to(ACC) * scale
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        g_off = (b * sgb + head * sgn + in_batch_offset(tt, hh, ww, sgt, sgh, sgw, OFF64))[:, None] + offs_d[None, :]
        tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=md)
        tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=md)
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=md)
        if HAS_BIAS:
            ds_sum += ds
    if HAS_BIAS:
        part = PART + (head * N_CHUNKS + chunk).to(tl.int64) * BLOCK * BLOCK
        tl.store(part + offs[:, None] * BLOCK + offs[None, :], ds_sum.to(PART.dtype.element_ty))
