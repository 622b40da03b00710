"""Opt-in experiments and GPU tuning knobs of the HTWA Triton backward, kept out of the shipped kernels. Nothing
here runs unless `TUNE` (empty by default) asks for it; benchmarks/gpu_htwa_tune.py sets it to time variants, and
benchmarks/gpu_suite.py may load the settings a tuning run chose (LFVILA_HTWA_TUNE).

TUNE keys:
    "legacy_kernels": True: the per-window kernels (htwa_fwd.py, htwa_bwd.py, htwa_dbias.py's chunk sum, launched
        by htwa_launch._legacy_fwd / _legacy_bwd) instead of the class-tile kernels (htwa_tiles.py), for the GPU
        A/B timing (benchmarks/gpu_htwa.py's "triton-legacy" rows). The experiments below run on the legacy
        backward too (they are variants of it).
    "fwd" | "bwd": {"block": int, "warps": int, "stages": int} (and "block_m", "block_n" for the forward): tile
        size and launch settings instead of htwa_launch._settings / _launch_kw.
    "programs_per_sm": int: dQ programs per SM the dbias chunk plan aims at (shipped: 16).
    "small_fused": True: the one-kernel backward (`_htwa_bwd_small_kernel`) for windows of <= SMALL_BOX_MAX
        tokens, until a GPU run has timed it against the two-kernel path; "small_warps": its warps (4).
    "dbias_kernel": True: the dbias workspace from its own kernel (`_htwa_bwd_dbias_kernel`), no
        read-modify-write in the dQ kernel.
    "no_dbias_rmw": True: DIAGNOSTIC, dbias is WRONG: the dQ kernel skips its dbias workspace updates, to time
        them. Only for benchmarks/gpu_htwa_tune.py's "diag_" variants.
Contract and math as the shipped kernels (htwa_bwd.py, htwa_dbias.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends._common import triton_interpreted as _interpreted
from .htwa_bwd import htwa_bwd_dkdv_kernel, htwa_bwd_dq_kernel
from .htwa_geometry import query_bias_offset, window_box, decode_token, head_token_offset

TUNE: dict = {}
SMALL_BOX_MAX = 64  # windows of at most this many tokens can take the one-kernel backward


def tile_override(block_m: int, block_n: int, nwin: int, backward: bool) -> tuple[int, int]:
    """TUNE's tile sizes (compiled runs only), capped at the window's padded token count."""
    cap = max(16, triton.next_power_of_2(nwin))
    tune = TUNE.get("bwd" if backward else "fwd", {})
    if "block" in tune:
        block_m = block_n = min(tune["block"], cap)
    if not backward:  # the backward's two kernels share one tile count: square tiles only
        block_m = min(tune.get("block_m", block_m), cap)
        block_n = min(tune.get("block_n", block_n), cap)
    return block_m, block_n


def launch_override(kw: dict, backward: bool) -> dict:
    """TUNE's warps / stages over the shipped launch keywords."""
    tune = TUNE.get("bwd" if backward else "fwd", {})
    if "warps" in tune:
        kw["num_warps"] = tune["warps"]
    if "stages" in tune:
        kw["num_stages"] = tune["stages"]
    return kw


def programs_per_sm(default: int) -> int:
    return TUNE.get("programs_per_sm", default)


def small_box_block(nwin: int, block_d: int) -> int:
    """Tile size of the one-kernel backward (`_htwa_bwd_small_kernel`) when it is to be used, else 0. Not for
    D > 64, where its seven tiles spill (ptxas, sm_90: 8 KB a thread at D = 128)."""
    if not TUNE.get("small_fused", False) or nwin > SMALL_BOX_MAX or block_d > 64:
        return 0
    return max(16, triton.next_power_of_2(nwin))


def backward_experiment_on() -> bool:
    """Whether the backward kernels are to be launched by `launch_bwd` instead of the shipped launcher."""
    return bool(TUNE.get("small_fused") or TUNE.get("dbias_kernel") or TUNE.get("no_dbias_rmw"))


def launch_bwd(plan: dict, log2e: float, launch_kw) -> None:
    """The backward kernels of an experiment, on the plan htwa_launch.htwa_bwd_triton made (`plan["small"]`: the
    one-kernel backward's tile, or 0); the dbias reduction after them is the shipped one."""
    q, k, v, geo, (nbt, nbh, nbw), n_tiles, heads, B = (plan[x] for x in ("q", "k", "v", "geo", "nb", "n_tiles",
                                                                          "heads", "B"))
    scale, cfg, has_bias, strides = plan["scale"], plan["cfg"], plan["has_bias"], plan["strides"]
    if plan["small"]:
        launch = {} if _interpreted() else dict(num_warps=TUNE.get("small_warps", 4))
        _htwa_bwd_small_kernel[(plan["n_chunks"], heads)](
            q, k, v, plan["bias_arg"], plan["out"], plan["dout"], plan["lse"], plan["dq"], plan["dk"], plan["dv"],
            plan["part"], plan["units"], plan["chunk_ptr"], *strides,
            *geo, nbt * nbh * nbw, nbh, nbw, float(scale), float(scale) * log2e,
            UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"], BLOCK=plan["small"], BLOCK_D=cfg["BLOCK_D"],
            **plan["geometry"], **launch,
        )
        return

    delta = torch.empty(q.shape[:5], dtype=plan["acc"], device=q.device)  # <dO, O> per row: dQ -> dK/dV kernel
    consts = dict(plan["geometry"], **cfg, **launch_kw(cfg, backward=True))
    dbias_kernel = has_bias and TUNE.get("dbias_kernel", False)
    htwa_bwd_dq_kernel[(plan["n_chunks"], n_tiles, heads)](
        q, k, v, plan["bias_arg"], plan["out"], plan["dout"], plan["lse"], delta, plan["dq"], plan["part"],
        plan["units"], plan["chunk_ptr"], *strides,
        *geo, nbt * nbh * nbw, nbh, nbw, float(scale), float(scale) * log2e,
        DBIAS=has_bias and not dbias_kernel and not TUNE.get("no_dbias_rmw", False), **consts,
    )
    if dbias_kernel:  # the workspace from its own kernel (reads the DELTA the dQ kernel just wrote)
        _htwa_bwd_dbias_kernel[(plan["n_chunks"], n_tiles * n_tiles, heads)](
            q, k, v, plan["bias_arg"], plan["dout"], plan["lse"], delta, plan["part"], plan["units"],
            plan["chunk_ptr"], *strides[:25],
            *geo, nbt * nbh * nbw, nbh, nbw, n_tiles, float(scale) * log2e,
            **{k_: v_ for k_, v_ in consts.items() if k_ != "HAS_BIAS"},
        )
    htwa_bwd_dkdv_kernel[(nbt * nbh * nbw * n_tiles, heads, B)](
        q, k, v, plan["bias_arg"], plan["dout"], plan["lse"], delta, plan["dk"], plan["dv"], *strides,
        *geo, nbh, nbw, n_tiles, float(scale), float(scale) * log2e, **consts,
    )


# --------------------------------------------------------------------------------------------------------------
# the opt-in kernels


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
        t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        m_ok = offs_m < nb
        n_ok = offs_n < nb
        mn = m_ok[:, None] & n_ok[None, :]
        md = m_ok[:, None] & d_ok[None, :]
        nd = n_ok[:, None] & d_ok[None, :]
        tq, hq, wq, n_q, r_q = decode_token(offs_m, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        tk, hk, wk, n_k, r_k = decode_token(offs_n, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        q = tl.load(Q + head_token_offset(b, head, tq, hq, wq, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        do = tl.load(DOUT + head_token_offset(b, head, tq, hq, wq, sob, son, sot, soh, sow)[:, None] + offs_d[None, :],
                     mask=md, other=0.0)
        k = tl.load(K + head_token_offset(b, head, tk, hk, wk, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=nd,
                    other=0.0)
        v = tl.load(V + head_token_offset(b, head, tk, hk, wk, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=nd,
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        l_ptr = head_token_offset(b, head, tq, hq, wq, slb, sln, slt, slh, slw)
        lse2 = tl.load(LSE + l_ptr, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_ptr, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        bq = query_bias_offset(r_q, head, BT, BH, BW)
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
        t0, h0, w0, lh, lw, ct, ch, cw, nb = window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW)
        ok = offs < nb
        md = ok[:, None] & d_ok[None, :]
        ok2 = ok[:, None] & ok[None, :]
        tt, hh, ww, n_q, r = decode_token(offs, t0, h0, w0, lh, lw, ct, ch, cw, WH, WW, BH, BW)
        q = tl.load(Q + head_token_offset(b, head, tt, hh, ww, sqb, sqn, sqt, sqh, sqw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        k = tl.load(K + head_token_offset(b, head, tt, hh, ww, skb, skn, skt, skh, skw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        v = tl.load(V + head_token_offset(b, head, tt, hh, ww, svb, svn, svt, svh, svw)[:, None] + offs_d[None, :], mask=md,
                    other=0.0)
        o_ptr = head_token_offset(b, head, tt, hh, ww, sob, son, sot, soh, sow)[:, None] + offs_d[None, :]
        do = tl.load(DOUT + o_ptr, mask=md, other=0.0)
        o = tl.load(OUT + o_ptr, mask=md, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        l_ptr = head_token_offset(b, head, tt, hh, ww, slb, sln, slt, slh, slw)
        lse2 = tl.load(LSE + l_ptr, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        if HAS_BIAS:
            bq = query_bias_offset(r, head, BT, BH, BW)
            s += tl.load(BIAS + (bq[:, None] - r[None, :]), mask=ok2, other=0.0).to(ACC) * 1.4426950408889634
        p = tl.where(ok2, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC).to(ACC) * scale
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        g_ptr = head_token_offset(b, head, tt, hh, ww, sgb, sgn, sgt, sgh, sgw)[:, None] + offs_d[None, :]
        tl.store(DQ + g_ptr, dq.to(DQ.dtype.element_ty), mask=md)
        tl.store(DK + g_ptr, dk.to(DK.dtype.element_ty), mask=md)
        tl.store(DV + g_ptr, dv.to(DV.dtype.element_ty), mask=md)
        if HAS_BIAS:
            ds_sum += ds
    if HAS_BIAS:
        part = PART + (chunk * HEADS + head).to(tl.int64) * (NWIN * NWIN)
        tl.store(part + n_q[:, None] * NWIN + n_q[None, :], ds_sum.to(PART.dtype.element_ty), mask=ok2)
