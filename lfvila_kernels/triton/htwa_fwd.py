"""Triton kernels of `htwa_attention` (the default CUDA backend): fused forward and backward, with a
deterministic relative-position-bias gradient. Tested on the CPU through the Triton interpreter
(`TRITON_INTERPRET=1`). Contract: csrc/HTWA_CONTRACT.md. fp16/bf16/fp32 on the GPU (fp32 accumulation; fp32
inputs use exact fp32 products, not TF32); fp64 only under the interpreter, where the kernels' float scalars
(scale, log2 e) are fp32, so fp64 results are good to ~1e-7 relative, not fp64 precision.

This file: the forward kernel (launched by htwa_launch.py; geometry helpers in htwa_geometry.py).

Softmax in base 2 (FlashAttention-2): s2 = log2(e) * (scale <q,k> + bias); m = running max, l = running sum of
2^(s2 - m); lse (natural log, stored) = ln(2) * (m + log2(l)). Backward: P = 2^(s2 - log2(e) * lse),
delta = <dO, O>, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, dbias[row] += dS.

Offsets: a token's element offset b*stride_b + t*stride_t + ... can pass 2^31 (q/k/v are views of a qkv tensor
with token stride 3*heads*D: B=256 at LF-VILA layer 0 is 256*30720*384 = 3.0e9 elements), so batch and token
offsets are computed in int64; head/feature offsets stay int32 (< heads*D <= 2^31 by far).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .htwa_geometry import query_bias_offset, window_box, decode_token, token_offset, head_token_offset


@triton.jit
def htwa_fwd_kernel(
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
    t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
    if tile * BLOCK_M >= nb:
        return
    ACC = LSE.dtype.element_ty

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < nb
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tq, hq, wq, n_q, r_q = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
    bq = query_bias_offset(r_q, head, BT, BH, BW)
    q = tl.load(Q + head_token_offset(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :],
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
        tk, hk, wk, n_k, r_k = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        k_off = token_offset(tk, hk, wk, skt, skh, skw)
        v_off = token_offset(tk, hk, wk, svt, svh, svw)
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
    tl.store(OUT + head_token_offset(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + head_token_offset(b, head, tq, hq, wq, slb, sln, slt, slh, slw), lse, mask=m_ok)
