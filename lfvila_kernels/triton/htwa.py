"""Triton kernels of `htwa_attention` (the default CUDA backend): fused forward and backward, with a
deterministic relative-position-bias gradient. Tested on the CPU through the Triton interpreter
(`TRITON_INTERPRET=1`). Contract: csrc/HTWA_CONTRACT.md. fp16/bf16/fp32 on the GPU (fp32 accumulation; fp32
inputs use exact fp32 products, not TF32); fp64 only under the interpreter, where the kernels' float scalars
(scale, log2 e) are fp32, so fp64 results are good to ~1e-7 relative, not fp64 precision.

Geometry (per axis with length L, window Wn, shift s). Query x attends key x' iff floor((x - s) / Wn) is the same
for both on all three axes, so the grid splits into disjoint BOXES. With the window ORIGIN offset
O = s - Wn if s > 0 else 0 (so O is congruent to s mod Wn and -Wn < O <= 0), box j of the axis is the window
[O + j*Wn, O + (j+1)*Wn) clipped to [0, L):

    start = max(O + j*Wn, 0),   len = min(O + (j+1)*Wn, L) - start,   boxes = ceil((L - O) / Wn)

and the in-window coordinate (x - s) mod Wn of a token x of the box is x - (O + j*Wn), i.e. (x - start) + c0 with
c0 = start - (O + j*Wn). Inside a box every query sees every key, so there is no mask but the tile padding.
Tokens of a box are flattened frame-major (i = (it*lh + ih)*lw + iw) and cut into tiles of BLOCK_M / BLOCK_N.

Bias row (spec 1.3): n = (c_t*Wh + c_h)*Ww + c_w in the WINDOW geometry, read back in BIAS_WINDOW geometry
(bt, bh, bw) = (n // (Bh*Bw), (n // Bw) % Bh, n % Bw), and
    row = ((bt_q - bt_k + Bt-1)*(2Bh-1) + (bh_q - bh_k + Bh-1))*(2Bw-1) + (bw_q - bw_k + Bw-1)
        = R(q) - R(k) + R0,   R(x) = (bt*(2Bh-1) + bh)*(2Bw-1) + bw,  R0 = R(Bt-1, Bh-1, Bw-1),
so each tile needs one R vector per side and the bias tile is a gather at (R_q + R0)[:, None] - R_k[None, :].

Softmax in base 2 (FlashAttention-2): s2 = log2(e) * (scale <q,k> + bias); m = running max, l = running sum of
2^(s2 - m); lse (natural log, stored) = ln(2) * (m + log2(l)). Backward: P = 2^(s2 - log2(e) * lse),
delta = <dO, O>, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, dbias[row] += dS.

Offsets: a token's element offset b*stride_b + t*stride_t + ... can pass 2^31 (q/k/v are views of a qkv tensor
with token stride 3*heads*D: B=256 at LF-VILA layer 0 is 256*30720*384 = 3.0e9 elements), so batch and token
offsets are computed in int64; head/feature offsets stay int32 (< heads*D <= 2^31 by far).

dbias without float atomics: the dQ kernel owns, per (chunk, head, query tile), a slice of a dense fp32
workspace PART[chunk, head, n_q, n_k] over in-window indices (N = Wt*Wh*Ww). A chunk is a fixed list of
(batch, box) units that all have the same box CLASS (per axis: the same clipped length and c0; at most 3 per
axis), so a query tile of any unit of the chunk maps to the same in-window rows n_q, and no two programs touch
the same workspace element; one program adds its units' dS in a fixed order (read-modify-write, a barrier
between units). Then the chunks are summed in order (`_chunk_sum_kernel`) and the dense (head, N, N) is
gathered into the table rows through a cached CSR inverse index built on the host (`_dbias_gather_kernel`),
also in a fixed order. Bitwise deterministic for a given device (the chunk plan depends on the SM count).
Memory bound: the workspace is n_chunks * heads * N^2 * 4 bytes, with n_chunks <= max(1, 64 MiB /
(heads * N^2 * 4)) + (number of box classes, <= 27): <= 64 MiB + 27 * heads * N^2 * 4 B, independent of B.
For the official LF-VILA shapes at B=16 on a 132-SM H100/H200 it is 7 MiB (layer 0) to 63 MiB (layers 2-4
shifted; layer 5: 2 chunks x 32 heads x 480^2 x 4 B = 56 MiB), plus at most 1/8 of that for the first level of
the chunk sum tree. (The reference materialises B * boxes * heads * N^2 attention weights several times.)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .._backends import acc_dtype as _acc_dtype, triton_interpreted as _interpreted

__all__ = ["htwa_fwd_triton", "htwa_bwd_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_WORKSPACE_BYTES = 64 << 20  # dbias workspace budget (see the module docstring)
BLOCK_OVERRIDE: Optional[int] = None  # tests only: force the tile size (a power of 2 >= 16)
# GPU tuning experiments only (benchmarks/gpu_htwa_tune.py): {"fwd" | "bwd": {"block": int, "warps": int,
# "stages": int}, "programs_per_sm": int, "small_fused": True (one-kernel backward for windows of <= 64 tokens),
# "small_warps": int, "dbias_kernel": True (the dbias workspace from its own kernel, no read-modify-write),
# "no_dbias_rmw": True}. "no_dbias_rmw" skips the dQ kernel's dbias workspace updates to time
# them; its dbias is then WRONG. Empty (the default) means the settings below.
TUNE: dict = {}


# --------------------------------------------------------------------------------------------------------------
# shared in-kernel helpers


@triton.jit
def _box(j, L, O, WN):
    """Box j along one axis: (start, length, c0), c0 = in-window coordinate of its first token."""
    o = j * WN + O
    start = tl.maximum(o, 0)
    length = tl.minimum(o + WN, L) - start
    return start, length, start - o


@triton.jit
def _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW):
    """Box `box` of the grid (t-major, NBH x NBW boxes per frame slab): its first token (t0, h0, w0), its extent
    along h and w (lh, lw), the in-window coordinates of its first token (ct, ch, cw) and its token count nb."""
    t0, lt, ct = _box(box // (NBH * NBW), T, OT, WT)
    h0, lh, ch = _box((box // NBW) % NBH, H, OH, WH)
    w0, lw, cw = _box(box % NBW, W, OW, WW)
    return t0, h0, w0, lh, lw, ct, ch, cw, lt * lh * lw


@triton.jit
def _decode(idx, t0, h0, w0, lh, lw, ct, ch, cw,
            WH: tl.constexpr, WW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Flat box indices -> (frame, row, column) as int64 (for offsets), in-window index n, bias key R."""
    lhw = lh * lw
    it = idx // lhw
    ih = (idx // lw) % lh
    iw = idx % lw
    xt = ct + it  # in-window coordinates
    xh = ch + ih
    xw = cw + iw
    n = (xt * WH + xh) * WW + xw
    if (BH == WH) and (BW == WW):
        # same geometry in h and w: n // (BH*BW) = xt, (n // BW) % BH = xh, n % BW = xw (no divisions)
        r = (xt * (2 * BH - 1) + xh) * (2 * BW - 1) + xw
    else:  # the bias_window quirk: read n back in the bias window's geometry
        r = ((n // (BH * BW)) * (2 * BH - 1) + (n // BW) % BH) * (2 * BW - 1) + n % BW
    return (t0 + it).to(tl.int64), (h0 + ih).to(tl.int64), (w0 + iw).to(tl.int64), n, r


@triton.jit
def _off(tt, hh, ww, st, sh, sw):
    """int64 element offsets of tokens (tt, hh, ww) through the frame/row/column strides."""
    return tt * st + hh * sh + ww * sw


@triton.jit
def _tok(b, head, tt, hh, ww, sb, sn, st, sh, sw):
    """int64 element offsets of tokens (tt, hh, ww) of batch b and head `head` in a (B, T, H, W, heads, ...) tensor
    with strides (sb, st, sh, sw, sn); a token's D elements follow at unit stride."""
    return (b.to(tl.int64) * sb + head * sn) + _off(tt, hh, ww, st, sh, sw)


@triton.jit
def _bias_q(r_q, head, BT, BH: tl.constexpr, BW: tl.constexpr):
    """Query side of the bias offset into the TRANSPOSED table (heads, nbias): (head, row) -> head * nbias + row
    = bq - R_k with bq = head * nbias + R_q + R0, so a tile costs one 2D subtraction (module docstring). Keys
    adjacent along w read adjacent table entries (R_k + 1), so a warp's gather is coalesced; in the (nbias,
    heads) layout they were `heads` entries apart, one memory sector per lane."""
    R0 = ((BT - 1) * (2 * BH - 1) + (BH - 1)) * (2 * BW - 1) + (BW - 1)
    nbias = (2 * BT - 1) * (2 * BH - 1) * (2 * BW - 1)
    return head * nbias + (r_q + R0)


# --------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _htwa_fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    T, H, W, HEADS, D: tl.constexpr, OT, OH, OW, NBH, NBW, N_TILES, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    BT, BH: tl.constexpr, BW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (box, query tile) x one (batch, head): online-softmax attention over the box's key tiles.

    Pointers: Q, K, V (B, T, H, W, heads, D) of any strides with unit last stride (s?b, s?t, s?h, s?w, s?n:
    batch, frame, row, column, head strides in elements); BIAS the TRANSPOSED table (heads, nbias) contiguous
    (unused when HAS_BIAS is False); OUT (strides so*), LSE (B, T, H, W, heads) accumulator dtype (strides sl*).
    Runtime: T, H, W grid; HEADS; D head dim; OT/OH/OW window origin offsets (module docstring); NBH, NBW boxes
    along h, w; N_TILES query tiles per box; qk_scale = scale * log2(e).
    WT, BT: temporal window and bias window (runtime: LF-VILA's layers differ only there, so they share one
    compiled kernel per dtype). Constexprs: WH/WW, BH/BW, HAS_BIAS, UPCAST (load 16-bit as fp32: interpreter),
    DOT_PREC ("ieee" for fp32 dots), tile sizes BLOCK_M (queries), BLOCK_N (keys), BLOCK_D (>= D, power of 2).
    Grid: (boxes * N_TILES, HEADS, B) (the y and z grid dims allow 65535 each).
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    box = pid // N_TILES
    tile = pid % N_TILES
    t0, h0, w0, lh, lw, ct, ch, cw, nb = _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_M >= nb:
        return
    ACC = LSE.dtype.element_ty

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tq, hq, wq, n_q, r_q = _decode(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
    bq = _bias_q(r_q, head, BT, BH, BW)
    q = tl.load(Q + _tok(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + (b.to(tl.int64) * skb + head * skn)
    v_base = V + (b.to(tl.int64) * svb + head * svn)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, nb, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nb
        tk, hk, wk, n_k, r_k = _decode(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        k_off = _off(tk, hk, wk, skt, skh, skw)
        v_off = _off(tk, hk, wk, svt, svh, svw)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:
            bias = tl.load(BIAS + (bq[:, None] - r_k[None, :]), mask=m_ok[:, None] & n_ok[None, :],
                           other=0.0)
            s += bias.to(ACC) * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # every key tile holds >= 1 real key, so m_new is finite and no row ever computes inf - inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC).to(ACC)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(OUT + _tok(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + _tok(b, head, tq, hq, wq, slb, sln, slt, slh, slw), lse, mask=m_ok)


# --------------------------------------------------------------------------------------------------------------
# backward: dQ (+ delta, + dbias workspace), then dK/dV, then the dbias reductions


@triton.jit
def _htwa_bwd_dq_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DELTA, DQ, PART, UNITS, CHUNK_PTR,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, HEADS, D: tl.constexpr, OT, OH, OW, NBOX, NBH, NBW, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    BT, BH: tl.constexpr, BW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DBIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (chunk, query tile, head): for each unit (batch, box) of the chunk, in order, dQ of the tile,
    delta = <dO, O> of its rows (stored for the dK/dV kernel) and, when HAS_BIAS, dS added into the dbias
    workspace PART[chunk, head, n_q, n_k] (fp32, (n_chunks, HEADS, N, N) contiguous, N = WT*WH*WW).

    Pointers: Q, K, V strided like the forward; OUT, DOUT contiguous-like with strides so*; DQ strides sg*;
    LSE, DELTA strides sl*; UNITS int32 list of b * NBOX + box, grouped by chunk; CHUNK_PTR int32 (n_chunks + 1) offsets
    into UNITS. All units of a chunk share one box class, hence one tile -> (n_q) map: this program is the only
    writer of its PART rows (module docstring). Constexprs as in the forward, plus DBIAS (update the workspace:
    HAS_BIAS, except in timing experiments, see TUNE). Grid: (n_chunks, N_TILES, HEADS).
    """
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    ACC = LSE.dtype.element_ty
    NWIN = WT * WH * WW
    u_lo = tl.load(CHUNK_PTR + chunk)
    u_hi = tl.load(CHUNK_PTR + chunk + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    part = PART + (chunk * HEADS + head).to(tl.int64) * (NWIN * NWIN)
    for ui in range(u_lo, u_hi):
        unit = tl.load(UNITS + ui)
        b = unit // NBOX
        box = unit % NBOX
        t0, h0, w0, lh, lw, ct, ch, cw, nb = _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        if tile * BLOCK_M < nb:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < nb
            md = m_ok[:, None] & d_ok[None, :]
            tq, hq, wq, n_q, r_q = _decode(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
            bq = _bias_q(r_q, head, BT, BH, BW)
            o_base = _tok(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :]
            l_ptr = _tok(b, head, tq, hq, wq, slb, sln, slt, slh, slw)
            q = tl.load(Q + _tok(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
                        other=0.0)
            do = tl.load(DOUT + o_base, mask=md, other=0.0)
            o = tl.load(OUT + o_base, mask=md, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
            tl.store(DELTA + l_ptr, delta, mask=m_ok)
            lse2 = tl.load(LSE + l_ptr, mask=m_ok, other=0.0) * 1.4426950408889634
            k_base = K + (b.to(tl.int64) * skb + head * skn)
            v_base = V + (b.to(tl.int64) * svb + head * svn)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
            for start_n in range(0, nb, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < nb
                tk, hk, wk, n_k, r_k = _decode(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
                k_off = _off(tk, hk, wk, skt, skh, skw)
                v_off = _off(tk, hk, wk, svt, svh, svw)
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                mn = m_ok[:, None] & n_ok[None, :]
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
                if HAS_BIAS:
                    bias = tl.load(BIAS + (bq[:, None] - r_k[None, :]), mask=mn, other=0.0)
                    s += bias.to(ACC) * 1.4426950408889634
                p = tl.where(mn, tl.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC)
                if DBIAS:
                    # read-modify-write of this program's own workspace slice: in-window indices are unique
                    # inside a box, so no two elements of the tile share an address
                    pp = part + n_q[:, None] * NWIN + n_k[None, :]
                    cur = tl.load(pp, mask=mn, other=0.0, cache_modifier=".cg")  # L2: coherent across threads
                    tl.store(pp, cur + ds.to(PART.dtype.element_ty), mask=mn)
            g_ptr = _tok(b, head, tq, hq, wq, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
            tl.store(DQ + g_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=md)
        # the next unit may read a workspace element that another thread of this program just wrote
        tl.debug_barrier()


@triton.jit
def _htwa_bwd_dkdv_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, HEADS, D: tl.constexpr, OT, OH, OW, NBH, NBW, N_TILES, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    BT, BH: tl.constexpr, BW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (box, key tile) x one (batch, head): dK, dV of the tile, looping over the box's query tiles in the
    transposed orientation (S^T = K Q^T), so no atomics. DOUT uses strides so*, DK and DV sg*; LSE, DELTA (from
    the dQ kernel) strides sl*; the rest as in the forward. Grid: (boxes * N_TILES, HEADS, B), N_TILES key tiles.
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    box = pid // N_TILES
    tile = pid % N_TILES
    t0, h0, w0, lh, lw, ct, ch, cw, nb = _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_N >= nb:
        return
    ACC = LSE.dtype.element_ty

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd = n_ok[:, None] & d_ok[None, :]
    tk, hk, wk, n_k, r_k = _decode(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
    bk = r_k
    k = tl.load(K + _tok(b, head, tk, hk, wk, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=nd, other=0.0)
    v = tl.load(V + _tok(b, head, tk, hk, wk, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + (b.to(tl.int64) * sqb + head * sqn)
    o_base = b.to(tl.int64) * sob + head * son
    l_base = b.to(tl.int64) * slb + head * sln

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, nb, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < nb
        md = m_ok[:, None] & d_ok[None, :]
        tq, hq, wq, n_q, r_q = _decode(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        bq = _bias_q(r_q, head, BT, BH, BW)
        q_off = _off(tq, hq, wq, sqt, sqh, sqw)
        o_off = _off(tq, hq, wq, sot, soh, sow)
        l_off = _off(tq, hq, wq, slt, slh, slw)
        q = tl.load(q_base + q_off[:, None] + offs_d[None, :], mask=md, other=0.0)
        do = tl.load(DOUT + o_base + o_off[:, None] + offs_d[None, :], mask=md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + l_base + l_off, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_base + l_off, mask=m_ok, other=0.0)
        nm = n_ok[:, None] & m_ok[None, :]
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC).to(ACC) * qk_scale  # (keys, queries)
        if HAS_BIAS:
            bias_t = tl.load(BIAS + (bq[None, :] - bk[:, None]), mask=nm, other=0.0)
            st += bias_t.to(ACC) * 1.4426950408889634
        pt = tl.where(nm, tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC).to(ACC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC).to(ACC)

    ptrs = _tok(b, head, tk, hk, wk, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=nd)


@triton.jit
def _htwa_bwd_dbias_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, PART, UNITS, CHUNK_PTR,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    T, H, W, HEADS, D: tl.constexpr, OT, OH, OW, NBOX, NBH, NBW, N_TILES, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    BT, BH: tl.constexpr, BW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dbias workspace without read-modify-write (opt-in, TUNE["dbias_kernel"]): one (chunk, query tile x key
    tile, head) per program recomputes P and dS of that tile pair for each unit of the chunk (DELTA from the dQ
    kernel, run with DBIAS=False), sums dS over the units in registers and stores PART[chunk, head] once. The
    chunk's units share one box class, so the tile pair maps to the same in-window (n_q, n_k) block for all of
    them. Costs two more products per tile pair and unit than the dQ kernel's in-loop update, which it replaces.
    Strides as in the dQ kernel. Grid: (n_chunks, N_TILES * N_TILES, HEADS)."""
    chunk = tl.program_id(0)
    pair = tl.program_id(1)
    head = tl.program_id(2)
    tq_i = pair // N_TILES
    tk_j = pair % N_TILES
    ACC = LSE.dtype.element_ty
    NWIN = WT * WH * WW
    u_lo = tl.load(CHUNK_PTR + chunk)
    u_hi = tl.load(CHUNK_PTR + chunk + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_m = tq_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tk_j * BLOCK_N + tl.arange(0, BLOCK_N)
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    n_q = offs_m  # set by the units; identical for every unit of the chunk (one box class)
    n_k = offs_n
    mn = (offs_m[:, None] < 0) & (offs_n[None, :] < 0)
    for ui in range(u_lo, u_hi):
        unit = tl.load(UNITS + ui)
        b = unit // NBOX
        box = unit % NBOX
        t0, h0, w0, lh, lw, ct, ch, cw, nb = _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        m_ok = offs_m < nb
        n_ok = offs_n < nb
        mn = m_ok[:, None] & n_ok[None, :]
        md = m_ok[:, None] & d_ok[None, :]
        nd = n_ok[:, None] & d_ok[None, :]
        tq, hq, wq, n_q, r_q = _decode(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        tk, hk, wk, n_k, r_k = _decode(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        q = tl.load(Q + _tok(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        do = tl.load(DOUT + _tok(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :],
                     mask=md, other=0.0)
        k = tl.load(K + _tok(b, head, tk, hk, wk, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=nd,
                    other=0.0)
        v = tl.load(V + _tok(b, head, tk, hk, wk, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=nd,
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        l_ptr = _tok(b, head, tq, hq, wq, slb, sln, slt, slh, slw)
        lse2 = tl.load(LSE + l_ptr, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_ptr, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        bq = _bias_q(r_q, head, BT, BH, BW)
        s += tl.load(BIAS + (bq[:, None] - r_k[None, :]), mask=mn, other=0.0).to(ACC) * 1.4426950408889634
        p = tl.where(mn, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds_sum += p * (dp - delta[:, None])
    part = PART + (chunk * HEADS + head).to(tl.int64) * (NWIN * NWIN)
    tl.store(part + n_q[:, None] * NWIN + n_k[None, :], ds_sum.to(PART.dtype.element_ty), mask=mn)


@triton.jit
def _htwa_bwd_small_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DQ, DK, DV, PART, UNITS, CHUNK_PTR,
    sqb, sqt, sqh, sqw, sqn,
    skb, skt, skh, skw, skn,
    svb, svt, svh, svw, svn,
    sob, sot, soh, sow, son,
    slb, slt, slh, slw, sln,
    sgb, sgt, sgh, sgw, sgn,
    T, H, W, HEADS, D: tl.constexpr, OT, OH, OW, NBOX, NBH, NBW, scale, qk_scale,
    WT, WH: tl.constexpr, WW: tl.constexpr,
    BT, BH: tl.constexpr, BW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole backward of boxes that fit one BLOCK x BLOCK tile (windows of <= 64 tokens: LF-VILA's layers 0
    and 1), one (chunk, head) per program: for each unit (batch, box) of the chunk, in order, P and dS once, then
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, where the two-kernel path computes P and dS twice. The chunk's
    units share one box class (same tile -> in-window index map), so dS is summed over them in registers and
    written to PART[chunk, head] once, with plain stores (this program owns that slice; no read-modify-write).
    Strides as in the dQ kernel. Grid: (n_chunks, HEADS)."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    ACC = LSE.dtype.element_ty
    NWIN = WT * WH * WW
    u_lo = tl.load(CHUNK_PTR + chunk)
    u_hi = tl.load(CHUNK_PTR + chunk + 1)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ds_sum = tl.zeros([BLOCK, BLOCK], dtype=ACC)
    n_q = offs  # set by the first unit; identical for every unit of the chunk (one box class)
    ok2 = (offs[:, None] < 0) & (offs[None, :] < 0)
    for ui in range(u_lo, u_hi):
        unit = tl.load(UNITS + ui)
        b = unit // NBOX
        box = unit % NBOX
        t0, h0, w0, lh, lw, ct, ch, cw, nb = _box3(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        ok = offs < nb
        md = ok[:, None] & d_ok[None, :]
        ok2 = ok[:, None] & ok[None, :]
        tt, hh, ww, n_q, r = _decode(offs, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        q = tl.load(Q + _tok(b, head, tt, hh, ww, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        k = tl.load(K + _tok(b, head, tt, hh, ww, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        v = tl.load(V + _tok(b, head, tt, hh, ww, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        o_ptr = _tok(b, head, tt, hh, ww, sob, son, sot, soh, sow)[:, None] + offs_d[None, :]
        do = tl.load(DOUT + o_ptr, mask=md, other=0.0)
        o = tl.load(OUT + o_ptr, mask=md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        l_ptr = _tok(b, head, tt, hh, ww, slb, sln, slt, slh, slw)
        lse2 = tl.load(LSE + l_ptr, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:
            bq = _bias_q(r, head, BT, BH, BW)
            s += tl.load(BIAS + (bq[:, None] - r[None, :]), mask=ok2, other=0.0).to(ACC) * 1.4426950408889634
        p = tl.where(ok2, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC).to(ACC) * scale
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        g_ptr = _tok(b, head, tt, hh, ww, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
        tl.store(DQ + g_ptr, dq.to(DQ.dtype.element_ty), mask=md)
        tl.store(DK + g_ptr, dk.to(DK.dtype.element_ty), mask=md)
        tl.store(DV + g_ptr, dv.to(DV.dtype.element_ty), mask=md)
        if HAS_BIAS:
            ds_sum += ds
    if HAS_BIAS:
        part = PART + (chunk * HEADS + head).to(tl.int64) * (NWIN * NWIN)
        tl.store(part + n_q[:, None] * NWIN + n_q[None, :], ds_sum.to(PART.dtype.element_ty), mask=ok2)


@triton.jit
def _chunk_sum_kernel(PART, OUT, NCHUNK, M, G, BLOCK: tl.constexpr):
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
def _dbias_gather_kernel(DENSE, ROW_PTR, PAIRS, DBIAS, NBIAS, HEADS, NN, MAXCNT,
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


# --------------------------------------------------------------------------------------------------------------
# launch helpers


def _origin(window, shift):
    """Window origin offset O per axis: s - Wn when shifted, else 0."""
    return tuple(s - w if s > 0 else 0 for w, s in zip(window, shift))


def _num_boxes(grid, window, origin):
    return tuple(-(-(L - o) // w) for L, w, o in zip(grid, window, origin))


def _settings(q, window, backward=False):
    nwin = window[0] * window[1] * window[2]
    D = q.shape[-1]
    upcast = _interpreted()
    block_d = max(16, triton.next_power_of_2(D))
    dot_fp32 = upcast or q.dtype in (torch.float32, torch.float64)
    # GPU forward, 4 warps: 64 x 64 tiles for 16-bit inputs up to D = 64 (LF-VILA: D = 32), 32 x 32 where exact
    # fp32 products (FMA units, fp32 operands in registers) or D > 64 would spill.
    # GPU backward, D <= 64: 16 x 16 tiles, 2 warps (below). Measured on an H100 (benchmarks/gpu_htwa_tune.py,
    # bf16, B=16, 2026-11-26): 1.6x faster over six official shapes than the previous 32 x 32 / 4 warps, which
    # needed 200-250 registers a thread (ptxas) and so ran few programs per SM, each waiting on its loads and on
    # the dQ kernel's dbias workspace updates; 64 x 64 / 8 warps was 1.4x slower. D > 64: 32 x 32 as before
    # (not measured on a GPU). The interpreter runs programs one by one in Python: one tile per box (<= 256).
    if upcast:
        cap = 256
    elif backward:
        cap = 16 if block_d <= 64 else 32
    else:
        cap = 32 if dot_fp32 or block_d > 64 else 64
    block = min(cap, max(16, triton.next_power_of_2(nwin)))
    block_m = block_n = block
    tune = TUNE.get("bwd" if backward else "fwd", {})
    if not upcast and "block" in tune:
        block_m = block_n = min(tune["block"], max(16, triton.next_power_of_2(nwin)))
    if not upcast and not backward:  # the backward's two kernels share one tile count: square tiles only
        block_m = min(tune.get("block_m", block_m), max(16, triton.next_power_of_2(nwin)))
        block_n = min(tune.get("block_n", block_n), max(16, triton.next_power_of_2(nwin)))
    if BLOCK_OVERRIDE is not None:
        block_m = block_n = BLOCK_OVERRIDE
    # fp32 inputs: exact fp32 products (no TF32), the contract's accuracy; 16-bit: tensor cores
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
                DOT_PREC="ieee" if dot_fp32 else "tf32")


SMALL_BOX_MAX = 64  # windows of at most this many tokens can take the one-kernel backward


def _small_box_block(nwin: int, block_d: int) -> int:
    """Tile size of the one-kernel backward (`_htwa_bwd_small_kernel`) when it is to be used, else 0. Opt-in
    (TUNE["small_fused"]) until a GPU run has timed it against the two-kernel path; the tests force it on. Not
    for D > 64, where its seven tiles spill (ptxas, sm_90: 8 KB a thread at D = 128)."""
    if not TUNE.get("small_fused", False) or nwin > SMALL_BOX_MAX or block_d > 64:
        return 0
    return max(16, triton.next_power_of_2(nwin))


def _launch_kw(cfg, backward=False):
    """4 warps; 8 for D > 64, where the (BLOCK, D) fp32 accumulators spill at 4 (ptxas, sm_90, D = 128); 2 for
    the backward's 16 x 16 tiles (see _settings)."""
    if _interpreted():
        return {}
    if cfg["BLOCK_D"] > 64:
        kw = dict(num_warps=8)
    else:
        kw = dict(num_warps=2 if backward and cfg["BLOCK_M"] <= 16 else 4)
    tune = TUNE.get("bwd" if backward else "fwd", {})
    if "warps" in tune:
        kw["num_warps"] = tune["warps"]
    if "stages" in tune:
        kw["num_stages"] = tune["stages"]
    return kw


def _strides5(x):
    return tuple(x.stride())[:5]


def _geometry_args(q, window, shift):
    B, T, H, W, heads, D = q.shape
    origin = _origin(window, shift)
    nbt, nbh, nbw = _num_boxes((T, H, W), window, origin)
    return (T, H, W, heads, D, *origin), (nbt, nbh, nbw)


def htwa_fwd_triton(q, k, v, bias: Optional[torch.Tensor], window, shift, bias_window, scale):
    """Contract: csrc/HTWA_CONTRACT.md. Returns (out, lse)."""
    window, shift, bias_window = tuple(window), tuple(shift), tuple(bias_window)
    B, T, H, W, heads, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=_acc_dtype(q.dtype), device=q.device)
    geo, (nbt, nbh, nbw) = _geometry_args(q, window, shift)
    cfg = _settings(q, window)
    nwin = window[0] * window[1] * window[2]
    n_tiles = triton.cdiv(nwin, cfg["BLOCK_M"])
    has_bias = bias is not None
    grid = (nbt * nbh * nbw * n_tiles, heads, B)
    _htwa_fwd_kernel[grid](
        q, k, v, bias.t().contiguous() if has_bias else q, out, lse,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride(),
        *geo, nbh, nbw, n_tiles, float(scale) * _LOG2E,
        *window, *bias_window, HAS_BIAS=has_bias, **cfg, **_launch_kw(cfg),
    )
    return out, lse


def _box_classes(L, window, origin):
    """Per box along one axis: a class id; boxes with the same (clipped length, c0) share it."""
    ids, seen = [], {}
    for j in range(-(-(L - origin) // window)):
        o = j * window + origin
        start = max(o, 0)
        key = (min(o + window, L) - start, start - o)
        ids.append(seen.setdefault(key, len(seen)))
    return ids


def _target_programs(device) -> int:
    if device.type == "cuda":
        per_sm = TUNE.get("programs_per_sm", 16)
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: small, so that tests see several chunks of several units


@functools.lru_cache(maxsize=64)
def _chunk_plan(B, grid, window, shift, heads, n_tiles, with_bias, device):
    """(units int32, chunk_ptr int32, n_chunks): units b * nbox + box grouped by box class, cut into chunks of
    at most `per` units of one class. `per` is set so the chunk count gives about `_target_programs` dQ programs
    and, with a bias, the fp32 workspace n_chunks * heads * N^2 stays within _WORKSPACE_BYTES plus one chunk per
    class (module docstring)."""
    origin = _origin(window, shift)
    cls = [_box_classes(L, w, o) for L, w, o in zip(grid, window, origin)]
    n_cls = [max(c) + 1 for c in cls]
    nbt, nbh, nbw = (len(c) for c in cls)
    nbox = nbt * nbh * nbw
    box = torch.arange(nbox)
    ct = torch.tensor(cls[0])[box // (nbh * nbw)]
    ch = torch.tensor(cls[1])[(box // nbw) % nbh]
    cw = torch.tensor(cls[2])[box % nbw]
    box_cls = (ct * n_cls[1] + ch) * n_cls[2] + cw
    total = B * nbox
    want = max(1, -(-_target_programs(device) // (heads * n_tiles)))
    if with_bias:
        nwin = window[0] * window[1] * window[2]
        want = min(want, max(1, _WORKSPACE_BYTES // (heads * nwin * nwin * 4)))
    per = max(1, -(-total // want)) if with_bias else 1  # no bias, no workspace: one unit per program
    units, ptr = [], [0]
    for c in torch.unique(box_cls).tolist():
        boxes = torch.nonzero(box_cls == c).flatten()
        u = (torch.arange(B)[:, None] * nbox + boxes[None, :]).flatten()
        units.append(u)
        for lo in range(0, u.numel(), per):
            ptr.append(ptr[-1] + min(per, u.numel() - lo))
    units = torch.cat(units).to(torch.int32).to(device)
    return units, torch.tensor(ptr, dtype=torch.int32, device=device), len(ptr) - 1


@functools.lru_cache(maxsize=32)
def _bias_csr(window, bias_window, device):
    """Inverse bias index: for each table row, the in-window pairs n_q * N + n_k (ascending) that read it.
    Returns (row_ptr int32 (nbias + 1), pairs int32 (N^2), max count)."""
    wt, wh, ww = window
    bt, bh, bw = bias_window
    n = torch.arange(wt * wh * ww)
    r = ((n // (bh * bw)) * (2 * bh - 1) + (n // bw) % bh) * (2 * bw - 1) + n % bw
    r0 = ((bt - 1) * (2 * bh - 1) + (bh - 1)) * (2 * bw - 1) + (bw - 1)
    rows = (r[:, None] - r[None, :] + r0).flatten()
    nbias = (2 * bt - 1) * (2 * bh - 1) * (2 * bw - 1)
    order = torch.sort(rows, stable=True).indices
    counts = torch.bincount(rows, minlength=nbias)
    ptr = torch.zeros(nbias + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return (ptr.to(torch.int32).to(device), order.to(torch.int32).to(device), int(counts.max()))


def _sum_chunks(part):
    """(C, M) -> (M,): ordered tree of `_chunk_sum_kernel` levels, G chunks per program and level."""
    G, block = (4, 16384) if _interpreted() else (8, 512)
    while part.shape[0] > 1:
        C, M = part.shape
        nxt = torch.empty((triton.cdiv(C, G), M), dtype=part.dtype, device=part.device)
        _chunk_sum_kernel[(triton.cdiv(M, block), nxt.shape[0])](part, nxt, C, M, G, BLOCK=block)
        part = nxt
    return part[0]


def htwa_bwd_triton(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dqkv=None):
    """Contract: csrc/HTWA_CONTRACT.md. Returns (dq, dk, dv, dbias); dbias is empty when bias is None.

    dqkv: optional (B, T, H, W, 3, heads, D) tensor for the packed op: dq, dk, dv are written straight into its
    three slices (views of it are returned), so autograd need not stack three gradients into the qkv gradient
    (on an H100 that copy was 0.47 ms of layer 0's 3.2 ms forward+backward, and 377 MB at B=16)."""
    window, shift, bias_window = tuple(window), tuple(shift), tuple(bias_window)
    B, T, H, W, heads, D = q.shape
    acc = _acc_dtype(q.dtype)
    # dout and out share one (contiguous) stride set, lse and delta another, the gradients a third (dq, dk, dv
    # have equal strides: separate tensors, or the slices of dqkv); the contiguous calls are no-ops per the contract
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    if dqkv is not None:
        dq, dk, dv = dqkv.unbind(4)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
    geo, (nbt, nbh, nbw) = _geometry_args(q, window, shift)
    cfg = _settings(q, window, backward=True)
    nwin = window[0] * window[1] * window[2]
    n_tiles = triton.cdiv(nwin, cfg["BLOCK_M"])
    has_bias = bias is not None
    small = _small_box_block(nwin, cfg["BLOCK_D"])
    if small:
        n_tiles = 1
    units, chunk_ptr, n_chunks = _chunk_plan(B, (T, H, W), window, shift, heads, n_tiles, has_bias, q.device)
    part = (torch.zeros((n_chunks, heads, nwin, nwin), dtype=acc, device=q.device) if has_bias
            else torch.empty(0, dtype=acc, device=q.device))
    strides = (*_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride(), *_strides5(dq))
    geometry = dict(WT=window[0], WH=window[1], WW=window[2], BT=bias_window[0], BH=bias_window[1],
                    BW=bias_window[2], HAS_BIAS=has_bias)
    bias_arg = bias.t().contiguous() if has_bias else q  # (heads, nbias): see _bias_q
    if small:
        launch = {} if _interpreted() else dict(num_warps=TUNE.get("small_warps", 4))
        _htwa_bwd_small_kernel[(n_chunks, heads)](
            q, k, v, bias_arg, out, dout, lse, dq, dk, dv, part, units, chunk_ptr, *strides,
            *geo, nbt * nbh * nbw, nbh, nbw, float(scale), float(scale) * _LOG2E,
            UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"], BLOCK=small, BLOCK_D=cfg["BLOCK_D"], **geometry,
            **launch,
        )
    else:
        delta = torch.empty(q.shape[:5], dtype=acc, device=q.device)  # <dO, O> per row: dQ kernel -> dK/dV kernel
        consts = dict(geometry, **cfg, **_launch_kw(cfg, backward=True))
        dbias_kernel = has_bias and TUNE.get("dbias_kernel", False)
        _htwa_bwd_dq_kernel[(n_chunks, n_tiles, heads)](
            q, k, v, bias_arg, out, dout, lse, delta, dq, part, units, chunk_ptr, *strides,
            *geo, nbt * nbh * nbw, nbh, nbw, float(scale), float(scale) * _LOG2E,
            DBIAS=has_bias and not dbias_kernel and not TUNE.get("no_dbias_rmw", False), **consts,
        )
        if dbias_kernel:  # the workspace from its own kernel (reads the DELTA the dQ kernel just wrote)
            _htwa_bwd_dbias_kernel[(n_chunks, n_tiles * n_tiles, heads)](
                q, k, v, bias_arg, dout, lse, delta, part, units, chunk_ptr, *strides[:25],
                *geo, nbt * nbh * nbw, nbh, nbw, n_tiles, float(scale) * _LOG2E,
                **{k_: v_ for k_, v_ in consts.items() if k_ != "HAS_BIAS"},
            )
        _htwa_bwd_dkdv_kernel[(nbt * nbh * nbw * n_tiles, heads, B)](
            q, k, v, bias_arg, dout, lse, delta, dk, dv, *strides,
            *geo, nbh, nbw, n_tiles, float(scale), float(scale) * _LOG2E, **consts,
        )
    if not has_bias:
        return dq, dk, dv, torch.empty(0, dtype=acc, device=q.device)
    dense = _sum_chunks(part.view(n_chunks, heads * nwin * nwin))
    row_ptr, pairs, maxcnt = _bias_csr(window, bias_window, q.device)
    nbias = bias.shape[0]
    dbias = torch.empty((nbias, heads), dtype=bias.dtype, device=q.device)
    block_r, block_j = (1024, 64) if _interpreted() else (32, 32)
    _dbias_gather_kernel[(triton.cdiv(nbias, block_r), heads)](
        dense, row_ptr, pairs, dbias, nbias, heads, nwin * nwin, maxcnt, BLOCK_R=block_r, BLOCK_J=block_j,
    )
    return dq, dk, dv, dbias
