"""Launch planning of the HTWA Triton kernels (the default CUDA backend; contract: csrc/HTWA_CONTRACT.md): tile
sizes and warps (`_settings`, `_launch_kw`, `_one_tile_block`, `_dssum_block`, `_tile_warps`), the box geometry
of a call (lfvila_kernels/geometry.py), and the two entry points `htwa_fwd_triton` / `htwa_bwd_triton`.

Default path (htwa_tiles.py; docs/kernels-gpu-plan.md): the bias table gathered once per call into per-class
tiles (`_bias_tiles`), chunks of one-class units (`_unit_plan`), dS partials reduced into table rows through a
cached CSR index (`_partials_csr`, htwa_dbias.dbias_gather_kernel).

Previous path, for the GPU A/B timing only (`_legacy_fwd`, `_legacy_bwd`: htwa_fwd.py, htwa_bwd.py and
htwa_dbias.py's chunk sum, with `_chunk_plan` and `_bias_csr`): taken while experimental.TUNE["legacy_kernels"]
is set, and for the backward while one of experimental.py's backward experiments is on (they are variants of
it). triton/experimental.py also holds the GPU tuning knobs (its `TUNE` dict, empty by default, overrides the
settings below for both paths).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from .. import geometry
from ..backends._common import acc_dtype as _acc_dtype, triton_interpreted as _interpreted
from . import experimental
from .htwa_bwd import htwa_bwd_dkdv_kernel, htwa_bwd_dq_kernel
from .htwa_dbias import chunk_sum_kernel, dbias_gather_kernel
from .htwa_fwd import htwa_fwd_kernel
from .htwa_tiles import (htwa_bwd_dkdv_tiles_kernel, htwa_bwd_dq_tiles_kernel, htwa_bwd_dssum_tiles_kernel,
                         htwa_bwd_one_tile_kernel, htwa_fwd_tiles_kernel)

__all__ = ["htwa_fwd_triton", "htwa_bwd_triton"]

LOG2E = 1.4426950408889634
_WORKSPACE_BYTES = 64 << 20  # dbias workspace budget (htwa_dbias.py)
BLOCK_OVERRIDE: Optional[int] = None  # tests only: force the tile size (a power of 2 >= 16)


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
    if not upcast:
        block_m, block_n = experimental.tile_override(block_m, block_n, nwin, backward)
    if BLOCK_OVERRIDE is not None:
        block_m = block_n = BLOCK_OVERRIDE
    # fp32 inputs: exact fp32 products (no TF32), the contract's accuracy; 16-bit: tensor cores
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
                DOT_PREC="ieee" if dot_fp32 else "tf32")


def _launch_kw(cfg, backward=False):
    """4 warps; 8 for D > 64, where the (BLOCK, D) fp32 accumulators spill at 4 (ptxas, sm_90, D = 128); 2 for
    the backward's 16 x 16 tiles (see _settings)."""
    if _interpreted():
        return {}
    if cfg["BLOCK_D"] > 64:
        kw = dict(num_warps=8)
    else:
        kw = dict(num_warps=2 if backward and cfg["BLOCK_M"] <= 16 else 4)
    return experimental.launch_override(kw, backward)


def _strides5(x):
    return tuple(x.stride())[:5]


def _geometry_args(q, window, shift):
    B, T, H, W, heads, D = q.shape
    origin = tuple(geometry.window_origin(w, s) for w, s in zip(window, shift))
    nbt, nbh, nbw = (geometry.num_boxes(L, w, s) for L, w, s in zip((T, H, W), window, shift))
    return (T, H, W, heads, D, *origin), (nbt, nbh, nbw)


def _legacy_fwd(q, k, v, bias: Optional[torch.Tensor], window, shift, bias_window, scale):
    """The per-window forward (htwa_fwd.py; TUNE["legacy_kernels"]). Returns (out, lse)."""
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
    htwa_fwd_kernel[grid](
        q, k, v, bias.t().contiguous() if has_bias else q, out, lse,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride(),
        *geo, nbh, nbw, n_tiles, float(scale) * LOG2E,
        *window, *bias_window, HAS_BIAS=has_bias, **cfg, **_launch_kw(cfg),
    )
    return out, lse


def _target_programs(device) -> int:
    if device.type == "cuda":
        per_sm = experimental.programs_per_sm(16)
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: small, so that tests see several chunks of several units


@functools.lru_cache(maxsize=64)
def _chunk_plan(B, grid, window, shift, heads, n_tiles, with_bias, device):
    """(units int32, chunk_ptr int32, n_chunks): units b * nbox + box grouped by box class, cut into chunks of
    at most `per` units of one class. `per` is set so the chunk count gives about `_target_programs` dQ programs
    and, with a bias, the fp32 workspace n_chunks * heads * N^2 stays within _WORKSPACE_BYTES plus one chunk per
    class (htwa_dbias.py)."""
    cls = [geometry.box_classes(L, w, s) for L, w, s in zip(grid, window, shift)]
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
    """Inverse bias index (geometry.bias_inverse): for each table row, the in-window pairs n_q * N + n_k
    (ascending) that read it. Returns (row_ptr int32 (nbias + 1), pairs int32 (N^2), max count)."""
    offsets, pairs = geometry.bias_inverse(window, bias_window)
    maxcnt = int((offsets[1:] - offsets[:-1]).max())
    return offsets.to(device), pairs.to(device), maxcnt


def _sum_chunks(part):
    """(C, M) -> (M,): ordered tree of `chunk_sum_kernel` levels, G chunks per program and level."""
    G, block = (4, 16384) if _interpreted() else (8, 512)
    while part.shape[0] > 1:
        C, M = part.shape
        nxt = torch.empty((triton.cdiv(C, G), M), dtype=part.dtype, device=part.device)
        chunk_sum_kernel[(triton.cdiv(M, block), nxt.shape[0])](part, nxt, C, M, G, BLOCK=block)
        part = nxt
    return part[0]


def _launch_bwd(plan):
    """The shipped backward kernels: dQ (+ delta, + the dbias workspace when there is a bias), then dK/dV."""
    q, geo, (nbt, nbh, nbw), n_tiles, heads, B = plan["q"], plan["geo"], plan["nb"], plan["n_tiles"], \
        plan["heads"], plan["B"]
    scale = plan["scale"]
    delta = torch.empty(q.shape[:5], dtype=plan["acc"], device=q.device)  # <dO, O> per row: dQ -> dK/dV kernel
    consts = dict(plan["geometry"], **plan["cfg"], **_launch_kw(plan["cfg"], backward=True))
    htwa_bwd_dq_kernel[(plan["n_chunks"], n_tiles, heads)](
        q, plan["k"], plan["v"], plan["bias_arg"], plan["out"], plan["dout"], plan["lse"], delta, plan["dq"],
        plan["part"], plan["units"], plan["chunk_ptr"], *plan["strides"],
        *geo, nbt * nbh * nbw, nbh, nbw, float(scale), float(scale) * LOG2E,
        DBIAS=plan["has_bias"], **consts,
    )
    htwa_bwd_dkdv_kernel[(nbt * nbh * nbw * n_tiles, heads, B)](
        q, plan["k"], plan["v"], plan["bias_arg"], plan["dout"], plan["lse"], delta, plan["dk"], plan["dv"],
        *plan["strides"], *geo, nbh, nbw, n_tiles, float(scale), float(scale) * LOG2E, **consts,
    )


def _legacy_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dq, dk, dv):
    """The per-window backward (htwa_bwd.py, htwa_dbias.py's chunk sum; TUNE["legacy_kernels"] and the
    experiments of triton/experimental.py): dbias through the dQ kernel's workspace."""
    B, T, H, W, heads, D = q.shape
    acc = _acc_dtype(q.dtype)
    geo, nb = _geometry_args(q, window, shift)
    cfg = _settings(q, window, backward=True)
    nwin = window[0] * window[1] * window[2]
    n_tiles = triton.cdiv(nwin, cfg["BLOCK_M"])
    has_bias = bias is not None
    small = experimental.small_box_block(nwin, cfg["BLOCK_D"])  # 0 unless that experiment is on
    if small:
        n_tiles = 1
    units, chunk_ptr, n_chunks = _chunk_plan(B, (T, H, W), window, shift, heads, n_tiles, has_bias, q.device)
    part = (torch.zeros((n_chunks, heads, nwin, nwin), dtype=acc, device=q.device) if has_bias
            else torch.empty(0, dtype=acc, device=q.device))
    plan = dict(
        q=q, k=k, v=v, out=out, dout=dout, lse=lse, dq=dq, dk=dk, dv=dv, part=part, units=units,
        chunk_ptr=chunk_ptr, n_chunks=n_chunks, n_tiles=n_tiles, heads=heads, B=B, acc=acc, scale=scale, geo=geo,
        nb=nb, cfg=cfg, has_bias=has_bias, small=small,
        strides=(*_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride(), *_strides5(dq)),
        geometry=dict(WT=window[0], WH=window[1], WW=window[2], BT=bias_window[0], BH=bias_window[1],
                      BW=bias_window[2], HAS_BIAS=has_bias),
        bias_arg=bias.t().contiguous() if has_bias else q,  # (heads, nbias): see htwa_geometry.query_bias_offset
    )
    if experimental.backward_experiment_on():
        experimental.launch_bwd(plan, LOG2E, _launch_kw)
    else:
        _launch_bwd(plan)
    if not has_bias:
        return dq, dk, dv, torch.empty(0, dtype=acc, device=q.device)
    dense = _sum_chunks(part.view(n_chunks, heads * nwin * nwin))
    row_ptr, pairs, maxcnt = _bias_csr(window, bias_window, q.device)
    nbias = bias.shape[0]
    dbias = torch.empty((nbias, heads), dtype=bias.dtype, device=q.device)
    block_r, block_j = (1024, 64) if _interpreted() else (32, 32)
    dbias_gather_kernel[(triton.cdiv(nbias, block_r), heads)](
        dense, row_ptr, pairs, dbias, nbias, heads, nwin * nwin, maxcnt, BLOCK_R=block_r, BLOCK_J=block_j,
    )
    return dq, dk, dv, dbias


# ---- the class-tile path (htwa_tiles.py): the default ----


def _legacy() -> bool:
    return bool(experimental.TUNE.get("legacy_kernels", False))


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@functools.lru_cache(maxsize=64)
def _class_rows(grid, window, shift, bias_window, pad, device, pack=1):
    """geometry.class_bias_rows on the device: (box_cls int32 (nbox,), rows int64 (n_classes * pad * pad,),
    n_classes, rows as a host tensor (n_classes, pad, pad)). pack > 1: `pack` windows of pad // pack tokens on
    the diagonal of each tile (the one-kernel backward's packing), -inf (row nbias + 1) between them."""
    box, rows, _ = geometry.class_bias_rows(grid, window, shift, bias_window, pad // pack)
    if pack > 1:
        wb = pad // pack
        i = torch.arange(pad)
        same = (i[:, None] // wb) == (i[None, :] // wb)
        rows = torch.where(same, rows[:, i[:, None] % wb, i[None, :] % wb], geometry.num_bias_rows(bias_window) + 1)
    return box.to(torch.int32).to(device), rows.flatten().to(device), rows.shape[0], rows


def _bias_tiles(bias, grid, window, shift, bias_window, pad, device, pack=1):
    """The per-call gather of the bias table into (heads, n_classes, pad, pad) tiles, log2(e) folded in, with a
    zero for padded query rows and -inf for padded keys (htwa_tiles.py). Returns (tiles, box_cls, n_classes)."""
    box_cls, rows, n_cls, _ = _class_rows(grid, window, shift, bias_window, pad, device, pack)
    heads = bias.shape[1]
    ext = torch.cat([bias.t() * LOG2E, bias.new_zeros(heads, 1), bias.new_full((heads, 1), float("-inf"))], 1)
    return ext[:, rows].view(heads, n_cls, pad, pad), box_cls, n_cls


def _off64(*tensors) -> bool:
    """Whether an in-batch offset t*st + h*sh + w*sw (+ a feature index) of any of these (B, T, H, W, ...) tensors
    can pass int32: then the tile kernels compute them in int64 (OFF64), else in int32 (one register per element
    of an address tile; the batch and head parts are always int64, on the scalar base)."""
    for x in tensors:
        _, T, H, W = x.shape[:4]
        st = x.stride()
        if (T - 1) * abs(st[1]) + (H - 1) * abs(st[2]) + (W - 1) * abs(st[3]) + 1024 >= 2**31:
            return True
    return False


def _off64_whole(*tensors) -> bool:
    """Whether any element offset of these tensors, batch included, can pass int32 (the one-kernel backward's
    OFF64: its rows come from several samples)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride())) + 1024 >= 2**31 for x in tensors)


def htwa_fwd_triton(q, k, v, bias: Optional[torch.Tensor], window, shift, bias_window, scale):
    """Contract: csrc/HTWA_CONTRACT.md. Returns (out, lse)."""
    if _legacy():
        return _legacy_fwd(q, k, v, bias, window, shift, bias_window, scale)
    window, shift, bias_window = tuple(window), tuple(shift), tuple(bias_window)
    B, T, H, W, heads, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=_acc_dtype(q.dtype), device=q.device)
    geo, (nbt, nbh, nbw) = _geometry_args(q, window, shift)
    cfg = _settings(q, window)
    nwin = window[0] * window[1] * window[2]
    pad = _round_up(nwin, max(cfg["BLOCK_M"], cfg["BLOCK_N"]))
    has_bias = bias is not None
    if has_bias:
        tiles, box_cls, n_cls = _bias_tiles(bias, (T, H, W), window, shift, bias_window, pad, q.device)
    else:
        tiles, box_cls, n_cls = q, q, 1
    n_tiles = triton.cdiv(nwin, cfg["BLOCK_M"])
    htwa_fwd_tiles_kernel[(nbt * nbh * nbw * n_tiles, B, heads)](
        q, k, v, tiles, box_cls, out, lse,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride(),
        T, H, W, D, *geo[5:], nbh, nbw, n_tiles, n_cls, pad, float(scale) * LOG2E,
        window[0], window[1], window[2], HAS_BIAS=has_bias, OFF64=_off64(q, k, v, out, lse), **cfg,
        **_launch_kw(cfg),
    )
    return out, lse


def _one_tile_block(nwin: int, block_d: int) -> int:
    """Per-window block of the one-kernel backward when the window fits one (<= 64 tokens, D <= 64: LF-VILA
    layers 0-1), else 0. BLOCK_OVERRIDE (tests) forces the multi-tile kernels when the window exceeds it."""
    if nwin > experimental.SMALL_BOX_MAX or block_d > 64:
        return 0
    block = max(16, triton.next_power_of_2(nwin))
    if BLOCK_OVERRIDE is not None and BLOCK_OVERRIDE < block:
        return 0
    return block


def _one_tile_pack(block: int) -> int:
    """Windows packed per tile of the one-kernel backward: as many as make 64 rows (layer 0: two 30-token windows
    in 32-row blocks), so its products have the tensor cores' 64-row shape."""
    return max(1, 64 // block)


def _dssum_block(cfg, nwin: int) -> int:
    """Tile of the dS-sum kernel: 64 for 16-bit inputs with D <= 64 (tensor-core sized), 32 otherwise; the
    interpreter and BLOCK_OVERRIDE use the backward's tile."""
    if _interpreted() or BLOCK_OVERRIDE is not None:
        return cfg["BLOCK_M"]
    block = 32 if cfg["DOT_PREC"] == "ieee" or cfg["BLOCK_D"] > 64 else 64
    return min(block, max(16, triton.next_power_of_2(nwin)))


def _tile_warps(block: int, block_d: int) -> int:
    """Warps of the one-kernel backward and the dS-sum kernel: 8 from 64 x 64 tiles (or D > 64) on, where 4
    spill (ptxas, sm_90, bf16, D = 32: 255 registers and 16-68 bytes of spills at 4 warps, none at 8;
    docs/kernels-gpu-plan.md), else 4."""
    return 8 if block >= 64 or block_d > 64 else 4


@functools.lru_cache(maxsize=64)
def _unit_plan(B, grid, window, shift, programs_per_chunk, slot_bytes, device, multiple=1):
    """Chunks of (batch, box) units, each of ONE class: (units int32, chunk_ptr int32, chunk_cls tuple,
    n_chunks). The chunk count aims at `_target_programs` programs (each chunk runs `programs_per_chunk`) and keeps
    the dS partials n_chunks * slot_bytes within _WORKSPACE_BYTES, plus at most one chunk per class. Chunks hold
    a multiple of `multiple` units (the one-kernel backward's packing) but for each class's last one."""
    box_cls, _ = geometry.box_class_ids(grid, window, shift)
    nbox = box_cls.numel()
    want = max(1, -(-_target_programs(device) // programs_per_chunk))
    want = min(want, max(1, _WORKSPACE_BYTES // slot_bytes))
    per = _round_up(max(1, -(-(B * nbox) // want)), multiple)
    units, ptr, cls_of = [], [0], []
    for c in torch.unique(box_cls).tolist():
        boxes = torch.nonzero(box_cls == c).flatten()
        u = (torch.arange(B)[:, None] * nbox + boxes[None, :]).flatten()
        units.append(u)
        for lo in range(0, u.numel(), per):
            ptr.append(ptr[-1] + min(per, u.numel() - lo))
            cls_of.append(c)
    units = torch.cat(units).to(torch.int32).to(device)
    return units, torch.tensor(ptr, dtype=torch.int32, device=device), tuple(cls_of), len(cls_of)


@functools.lru_cache(maxsize=64)
def _partials_csr(grid, window, shift, bias_window, pad, chunk_cls, device, pack=1):
    """CSR from table rows to the dS partials PART[head] (n_chunks, pad, pad) flattened: for each row, the
    ascending flat positions chunk * pad^2 + i * pad + j of the (query i, key j) pairs of each chunk's class that
    read it. Returns (row_ptr int32 (nbias + 1), pairs int32, max count)."""
    *_, rows = _class_rows(grid, window, shift, bias_window, pad, torch.device("cpu"), pack)
    nbias = geometry.num_bias_rows(bias_window)
    r = rows[torch.tensor(chunk_cls, dtype=torch.int64)].flatten()
    pos = torch.nonzero(r < nbias).flatten()
    r = r[pos]
    order = torch.sort(r, stable=True).indices  # ascending position inside each row
    counts = torch.bincount(r, minlength=nbias)
    ptr = torch.zeros(nbias + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr.to(torch.int32).to(device), pos[order].to(torch.int32).to(device), int(counts.max())


def _reduce_partials(part, bias, grid, window, shift, bias_window, pad, chunk_cls, pack=1):
    """dbias (nbias, heads) from PART (heads, n_chunks, pad, pad) in a fixed order (htwa_dbias.dbias_gather_kernel)."""
    heads = part.shape[0]
    row_ptr, pairs, maxcnt = _partials_csr(grid, window, shift, bias_window, pad, chunk_cls, part.device, pack)
    nbias = bias.shape[0]
    dbias = torch.empty((nbias, heads), dtype=bias.dtype, device=part.device)
    block_r, block_j = (1024, 64) if _interpreted() else (32, 64)
    dbias_gather_kernel[(triton.cdiv(nbias, block_r), heads)](
        part, row_ptr, pairs, dbias, nbias, heads, part[0].numel(), maxcnt, BLOCK_R=block_r, BLOCK_J=block_j,
    )
    return dbias


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
    if _legacy() or experimental.backward_experiment_on():
        return _legacy_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dq, dk, dv)

    grid = (T, H, W)
    geo, (nbt, nbh, nbw) = _geometry_args(q, window, shift)
    nbox = nbt * nbh * nbw
    cfg = _settings(q, window, backward=True)
    nwin = window[0] * window[1] * window[2]
    has_bias = bias is not None
    one = _one_tile_block(nwin, cfg["BLOCK_D"])
    pack = _one_tile_pack(one) if one else 1
    block_s = _dssum_block(cfg, nwin)
    pad = one * pack or _round_up(nwin, max(cfg["BLOCK_M"], cfg["BLOCK_N"], block_s))
    if has_bias:
        tiles, box_cls, n_cls = _bias_tiles(bias, grid, window, shift, bias_window, pad, q.device, pack)
    else:
        tiles, box_cls, n_cls = q, q, 1
    strides = (*_strides5(q), *_strides5(k), *_strides5(v), *_strides5(out), *lse.stride())
    geometry_kw = dict(WT=window[0], WH=window[1], WW=window[2])
    empty = torch.empty(0, dtype=acc, device=q.device)
    off64 = _off64(q, k, v, out, dout, lse, dq)
    slot_bytes = heads * pad * pad * 4

    if one:
        units, chunk_ptr, chunk_cls, n_chunks = _unit_plan(B, grid, window, shift, heads, slot_bytes, q.device,
                                                           pack)
        part = torch.empty((heads, n_chunks, pad, pad), dtype=acc, device=q.device) if has_bias else empty
        launch = {} if _interpreted() else dict(num_warps=_tile_warps(pad, cfg["BLOCK_D"]))
        htwa_bwd_one_tile_kernel[(n_chunks, heads)](
            q, k, v, tiles, box_cls, out, dout, lse, dq, dk, dv, part, units, chunk_ptr, *strides, *_strides5(dq),
            T, H, W, D, *geo[5:], nbox, nbh, nbw, n_cls, n_chunks, float(scale), float(scale) * LOG2E,
            **geometry_kw, HAS_BIAS=has_bias, UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"],
            OFF64=_off64_whole(q, k, v, out, dout, lse, dq), BLOCK=pad, WB=one, BLOCK_D=cfg["BLOCK_D"], **launch,
        )
    else:
        delta = torch.empty(q.shape[:5], dtype=acc, device=q.device)  # <dO, O> per row, computed once
        n_tiles = triton.cdiv(nwin, cfg["BLOCK_M"])
        consts = dict(geometry_kw, HAS_BIAS=has_bias, OFF64=off64, **cfg, **_launch_kw(cfg, backward=True))
        common = (*strides, *_strides5(dq), T, H, W, D, *geo[5:], nbh, nbw, n_tiles, n_cls, pad, float(scale),
                  float(scale) * LOG2E)
        htwa_bwd_dq_tiles_kernel[(nbox * n_tiles, B, heads)](
            q, k, v, tiles, box_cls, out, dout, lse, delta, dq, *common, **consts)
        htwa_bwd_dkdv_tiles_kernel[(nbox * n_tiles, B, heads)](
            q, k, v, tiles, box_cls, dout, lse, delta, dk, dv, *common, **consts)
        if has_bias:
            s_tiles = triton.cdiv(nwin, block_s)
            units, chunk_ptr, chunk_cls, n_chunks = _unit_plan(B, grid, window, shift, heads * s_tiles * s_tiles,
                                                               slot_bytes, q.device)
            part = torch.empty((heads, n_chunks, pad, pad), dtype=acc, device=q.device)
            s_cfg = dict(cfg, BLOCK_M=block_s, BLOCK_N=block_s, OFF64=off64)
            launch = {} if _interpreted() else dict(num_warps=_tile_warps(block_s, cfg["BLOCK_D"]))
            htwa_bwd_dssum_tiles_kernel[(n_chunks, s_tiles * s_tiles, heads)](
                q, k, v, tiles, box_cls, dout, lse, delta, part, units, chunk_ptr, *strides,
                T, H, W, D, *geo[5:], nbox, nbh, nbw, s_tiles, n_cls, pad, n_chunks, float(scale) * LOG2E,
                **geometry_kw, **s_cfg, **launch,
            )
    if not has_bias:
        return dq, dk, dv, empty
    return dq, dk, dv, _reduce_partials(part, bias, grid, window, shift, bias_window, pad, chunk_cls, pack)
