"""The HTWA backward kernels of the Triton backend (launched by htwa_launch.py): dQ (+ delta = <dO, O>, + the
dbias workspace, see htwa_dbias.py), then dK/dV. Math: FlashAttention-2 in base 2 (htwa_fwd.py):
P = 2^(s2 - log2(e) * lse), delta = <dO, O>, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q,
dV = P^T dO, dbias[row] += dS. Offsets in int64 as in the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .htwa_geometry import query_bias_offset, window_box, decode_token, token_offset, head_token_offset


@triton.jit
def htwa_bwd_dq_kernel(
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
    HAS_BIAS; the timing experiments of
    triton/experimental.py may turn it off). Grid: (n_chunks, N_TILES, HEADS).
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
        t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        if tile * BLOCK_M < nb:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < nb
            md = m_ok[:, None] & d_ok[None, :]
            tq, hq, wq, n_q, r_q = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
            bq = query_bias_offset(r_q, head, BT, BH, BW)
            o_base = head_token_offset(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :]
            l_ptr = head_token_offset(b, head, tq, hq, wq, slb, sln, slt, slh, slw)
            q = tl.load(Q + head_token_offset(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
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
                tk, hk, wk, n_k, r_k = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
                k_off = token_offset(tk, hk, wk, skt, skh, skw)
                v_off = token_offset(tk, hk, wk, svt, svh, svw)
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
            g_ptr = head_token_offset(b, head, tq, hq, wq, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
            tl.store(DQ + g_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=md)
        # the next unit may read a workspace element that another thread of this program just wrote
        tl.debug_barrier()


@triton.jit
def htwa_bwd_dkdv_kernel(
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
    t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_N >= nb:
        return
    ACC = LSE.dtype.element_ty

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd = n_ok[:, None] & d_ok[None, :]
    tk, hk, wk, n_k, r_k = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
    bk = r_k
    k = tl.load(K + head_token_offset(b, head, tk, hk, wk, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=nd, other=0.0)
    v = tl.load(V + head_token_offset(b, head, tk, hk, wk, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=nd, other=0.0)
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
        tq, hq, wq, n_q, r_q = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        bq = query_bias_offset(r_q, head, BT, BH, BW)
        q_off = token_offset(tq, hq, wq, sqt, sqh, sqw)
        o_off = token_offset(tq, hq, wq, sot, soh, sow)
        l_off = token_offset(tq, hq, wq, slt, slh, slw)
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

    ptrs = head_token_offset(b, head, tk, hk, wk, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=nd)
