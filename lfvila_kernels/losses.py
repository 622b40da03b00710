"""LF-VILA's contrastive losses (spec section 3) as ops that never store the batch x batch logit matrix.

- `info_nce_loss`: the video-paragraph loss VPC (spec 3.1), a symmetric InfoNCE. Same three layers as
  `htwa.py`: `lfvila::info_nce_fwd` / `lfvila::info_nce_bwd` are functional torch.library custom ops (fake kernel
  right below each) dispatching to the C++ CPU kernel (csrc/info_nce_cpu.cpp), the Triton kernels
  (triton/info_nce.py) or the row-panel GEMMs of backends/chunked.py; `register_autograd` ties them
  together; the public function checks, picks the backend and calls the op. With `distributed=True` each
  rank computes its local rows against the gathered global columns (and the symmetric part likewise), with
  rank-offset positives.
- `temporal_contrastive_loss`: the multimodal temporal contrastive loss MTC (spec 3.2). Its logits are
  (B, K, V + len(rolls)) -- a few hundred numbers -- so it is written in plain PyTorch (gather, batched dot,
  log-sum-exp, tie mask, masked mean: a handful of small ops, no Python loop); a custom kernel would not pay
  for itself.
- `sample_mtc_indices`: MTC's random key / value / other clip positions, drawn with the official distribution.
- `gather_with_grad`: differentiable all-gather (the official `SyncFunction`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch
from .backends import cpp
from .backends._common import acc_dtype as _acc_dtype
from ._checks import check_info_nce_args, check_mtc_args

__all__ = ["info_nce_loss", "temporal_contrastive_loss", "sample_mtc_indices", "gather_with_grad"]

LOSS_BACKENDS = ("auto", "cpp", "cuda", "triton", "chunked", "reference")
MTC_BACKENDS = ("auto", "torch", "reference")
_CPU_ORDER = ("cpp",)
# CUDA: the row-panel GEMMs first. On an H100 (bf16, D = 1024, fwd+bwd, 2026-11-26) they took 2.4 / 18 / 309 ms
# at N = 4096 / 16384 / 65536 against 4.6 / 58 / 903 ms for the Triton tiles (benchmarks/RESULTS.md).
_CUDA_ORDER = ("chunked", "triton", "cuda")


# --------------------------------------------------------------------------------------------------------------
# custom ops
#
# Contract of both ops (shared by every backend): a (N, D), b (M, D), logits z = a @ b^T / temperature, the
# positive of row i is column i + offset; loss = mean_i CE_row_i [+ mean_j CE_col_j when symmetric, which needs
# N == M and offset == 0]. lse_row (N,) / lse_col (M,) are the per-row / per-column log-sum-exp of z, saved for the
# backward; lse_col is empty (0,) when not symmetric. loss and lse are in the accumulation dtype (fp64 for fp64
# inputs, fp32 otherwise).


_compiled = cpp.ops


def _info_nce_shapes(a: Tensor, b: Tensor, symmetric: bool):
    acc = _acc_dtype(a.dtype)
    return (
        a.new_empty((), dtype=acc),
        a.new_empty((a.shape[0],), dtype=acc),
        a.new_empty((b.shape[0] if symmetric else 0,), dtype=acc),
    )


@torch.library.custom_op("lfvila::info_nce_fwd", mutates_args=())
def _info_nce_fwd(
    a: Tensor, b: Tensor, temperature: Tensor, offset: int, symmetric: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from .backends import triton

        return triton.info_nce_fwd(a, b, temperature, offset, symmetric)
    if backend == "chunked":
        from .backends.chunked import info_nce_fwd_chunked

        return info_nce_fwd_chunked(a, b, temperature, offset, symmetric)
    return _compiled().info_nce_fwd(a, b, 1.0 / float(temperature), offset, symmetric)


@_info_nce_fwd.register_fake
def _info_nce_fwd_fake(a, b, temperature, offset, symmetric, backend):
    return _info_nce_shapes(a, b, symmetric)


@torch.library.custom_op("lfvila::info_nce_bwd", mutates_args=())
def _info_nce_bwd(
    dloss: Tensor,
    a: Tensor,
    b: Tensor,
    temperature: Tensor,
    lse_row: Tensor,
    lse_col: Tensor,
    offset: int,
    symmetric: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .backends import triton

        return triton.info_nce_bwd(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric)
    if backend == "chunked":
        from .backends.chunked import info_nce_bwd_chunked

        return info_nce_bwd_chunked(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric)
    return _compiled().info_nce_bwd(dloss, a, b, lse_row, lse_col, 1.0 / float(temperature), offset, symmetric)


@_info_nce_bwd.register_fake
def _info_nce_bwd_fake(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric, backend):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    a, b, temperature, offset, symmetric, backend = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(a, b, temperature, lse_row, lse_col)
    ctx.params = (offset, symmetric, backend)
    ctx.mark_non_differentiable(lse_row, lse_col)


def _backward(ctx, dloss, _dlse_row, _dlse_col):
    a, b, temperature, lse_row, lse_col = ctx.saved_tensors
    offset, symmetric, backend = ctx.params
    da, db = torch.ops.lfvila.info_nce_bwd(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric, backend)
    dtemp = None
    if ctx.needs_input_grad[2]:
        # The loss depends on temperature only through z = a.b / t, so dL/dt = sum_ij g_ij * (-z_ij / t)
        # = -(1/t) sum_i a_i . dL/da_i: no extra kernel output is needed.
        acc = _acc_dtype(a.dtype)
        t = temperature.to(device=a.device, dtype=acc)
        dtemp = (-(a.to(acc) * da.to(acc)).sum() / t).to(device=temperature.device, dtype=temperature.dtype)
    return da, db, dtemp, None, None, None


_info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# distributed helpers


class _GatherWithGrad(torch.autograd.Function):
    """all_gather + cat forward; backward all-reduces (sums) the incoming gradient over the ranks and keeps this
    rank's rows, so that every rank's loss contributes to every rank's features (the official SyncFunction)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Differentiable all-gather along dim 0.

    Args:
        x: `(n, ...)` this rank's rows; every rank of `group` must pass the same shape.
        group: a torch.distributed process group (default: the world).

    Returns:
        `(world * n, ...)`, rank r's rows at `[r * n, (r + 1) * n)`. In the backward the incoming gradient is
        summed over the ranks (all_reduce) and this rank's slice is returned, as the official `SyncFunction`.
        Without an initialised process group (or with one rank) `x` itself is returned.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not _dist_ready():
        return x
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)


# --------------------------------------------------------------------------------------------------------------
# VPC: info_nce_loss


def _temperature_tensor(temperature, like: Tensor) -> Tensor:
    if isinstance(temperature, Tensor):
        return temperature
    return torch.full((), float(temperature), dtype=_acc_dtype(like.dtype), device=like.device)


def _resolve_backend(backend: str, device: str, dtype: torch.dtype) -> str:
    return _dispatch.resolve("info_nce_fwd", backend, device, dtype, _CPU_ORDER, _CUDA_ORDER)


def _rows_loss(a: Tensor, b: Tensor, temperature, offset: int, symmetric: bool, backend: str) -> Tensor:
    """mean CE over a's rows against all of b's rows (positives at offset) [+ the column CE when symmetric]."""
    if backend == "reference":
        from .backends.reference import info_nce_reference

        return info_nce_reference(a, b, temperature, symmetric=symmetric, offset=offset)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    loss, _, _ = torch.ops.lfvila.info_nce_fwd(a, b, _temperature_tensor(temperature, a), offset, symmetric, backend)
    return loss


def info_nce_loss(
    a: Tensor,
    b: Tensor,
    temperature,
    *,
    symmetric: bool = True,
    distributed: bool = False,
    group=None,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE over a batch with row-aligned positives: LF-VILA's VPC loss (spec 3.1), fused.

    With logits S = a @ b^T / temperature (N x N, never stored by the fused backends)::

        loss = CE_rows(S, diag) + CE_cols(S, diag)      (symmetric=True: the two directions summed)
             = -(1/N) sum_i log softmax_j(S_ij)[j=i] - (1/N) sum_j log softmax_i(S_ij)[i=j]

    Args:
        a, b: `(N, D)` features (e.g. video v_i and paragraph p_i), row i of a and row i of b a positive pair;
            same dtype (float16, bfloat16, float32, float64) and device. Any D; not normalised by the op.
        temperature: a positive Python float, or a 0-dim floating tensor (on a's device or the CPU) that may
            require grad (it then gets dL/dt = -(1/t) sum_i a_i . dL/da_i).
        symmetric: add the column (b -> a) direction (default True, as VPC).
        distributed: each rank passes its local `(n, D)` rows; b (and a, when symmetric) are gathered from all
            ranks of `group` with `gather_with_grad`; this rank's rows are scored against the global columns with
            positives at `rank * n + i`, and when symmetric its b rows against the global a likewise. No rank
            stores the (n x world*n) logits. The returned value is this rank's mean over its local rows; its
            average over the ranks is the global loss, and after the all-reduce in `gather_with_grad`'s backward
            each rank's feature gradients are `world` times those of the global loss, so that DDP's gradient
            averaging yields exactly the global loss's parameter gradients (as the official code, which computes
            the full loss on every rank). All ranks must use the same n. Without an initialised process group
            this is the local loss.
        group: process group for `distributed` (default: the world).
        backend: "auto" (C++ on CPU, chunked on CUDA), "cpp", "cuda" (csrc CUDA kernel), "triton" (CUDA, or CPU
            with TRITON_INTERPRET=1), "chunked" (any device: a in row panels, each panel's logits one
            cuBLAS/BLAS GEMM with fp32 output, O(panel x N) scratch; see backends/chunked.py) or
            "reference" (plain PyTorch, materialises the logits: the naive baseline).

    Returns:
        a 0-dim loss tensor: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16 inputs are accumulated in fp32);
        the reference backend returns the inputs' dtype.

    Memory: the fused backends keep O(N) log-sum-exp state and O(tile^2) scratch per thread; the gradients are
    recomputed tile by tile in the backward. "chunked" keeps one row panel's logits (R x N, R chosen for a
    256 MiB fp32 budget, `backends.chunked.PANEL_BUDGET_BYTES`) and recomputes them panel by panel.
    """
    check_info_nce_args(a, b, temperature, symmetric, check_value=not torch.compiler.is_compiling())
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {distributed!r}")
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    backend = _resolve_backend(backend, str(a.device), a.dtype)
    if isinstance(temperature, Tensor) and backend != "reference" and temperature.device != a.device:
        temperature = temperature.to(a.device)

    if distributed and _dist_ready():
        import torch.distributed as dist

        if dist.get_world_size(group) > 1:
            offset = dist.get_rank(group) * a.shape[0]
            loss = _rows_loss(a, gather_with_grad(b, group), temperature, offset, False, backend)
            if symmetric:
                loss = loss + _rows_loss(b, gather_with_grad(a, group), temperature, offset, False, backend)
            return loss
    return _rows_loss(a, b, temperature, 0, symmetric, backend)


# --------------------------------------------------------------------------------------------------------------
# MTC: temporal_contrastive_loss and its sampling


def _mtc_direction(A: Tensor, Bf: Tensor, key_idx, value_idx, other_idx, rolls, temperature, label, keep):
    batch = A.shape[0]
    rows = torch.arange(batch, device=A.device)
    keys = A[rows[:, None], key_idx]  # (B, K, C)
    values = Bf[rows[:, None], value_idx]  # (B, V, C)
    cands = [values]
    if rolls:
        other = Bf[rows, other_idx]  # (B, C): B_{i, o_i}
        # torch.roll(x, r, 0)[i] = x[(i - r) mod B]: the candidate B_{i-r, o_{i-r}} of spec 3.2
        cands.append(torch.stack([torch.roll(other, r, 0) for r in rolls], 1))  # (B, R, C)
    cands = torch.cat(cands, 1)  # (B, V + R, C)
    logits = torch.einsum("bkc,bjc->bkj", keys, cands) / temperature  # (B, K, V + R)
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, label[..., None])[..., 0]  # (B, K)
    kept = keep.to(ce.dtype)
    # mean over kept rows; 0 (not nan) when every row is a tie
    return (ce * kept).sum() / kept.sum().clamp(min=1)


def temporal_contrastive_loss(
    clips: Tensor,
    sents: Tensor,
    key_idx: Tensor,
    value_idx: Tensor,
    other_idx: Tensor,
    temperature,
    *,
    rolls: Sequence[int] = (0, 1, 2),
    backend: str = "auto",
) -> Tensor:
    """LF-VILA's multimodal temporal contrastive loss MTC (spec 3.2), with the random indices passed in.

    For direction A -> B (clips -> sentences and sentences -> clips, same indices and labels) and each key
    (i, k = key_idx[i, kk]) the logits are A[i, k] . cand_j / temperature over the candidates::

        [B[i, v_1], ..., B[i, v_V],  B[i - r, o_{i - r}] for r in rolls]      (i - r taken mod the batch)

    with v = value_idx[i], o = other_idx. The label is the value nearest in time to the key, argmin_j |v_j - k|
    (the first on ties); the row is ignored (the official label -100) when |v_1 - k| == |v_V - k| (V >= 2; the
    official rule compares only the first and the last value). Each direction is the mean CE over its kept rows
    (0 when all rows are ties), and the loss is the sum of the two directions.

    Example (M = 4, V = 2): key k = 1 with values (v_1, v_2) = (0, 3): distances 1 and 2, label 0 (B[i, 0]).
    Key k = 1 with values (0, 2): distances 1 and 1, a tie, the row is ignored.

    Args:
        clips, sents: `(B, M, C)` clip and sentence features, same dtype (float16, bfloat16, float32, float64)
            and device.
        key_idx: `(B, K)` integer clip positions in [0, M) of the keys.
        value_idx: `(B, V)` integer positions of the values (V >= 1).
        other_idx: `(B,)` integer position of each sample's "other" clip.
        temperature: positive float or 0-dim tensor (may require grad); the official value is 0.05.
        rolls: batch rolls giving the other negatives; (0, 1, 2) as released (roll 0 is a clip of the same
            video, spec 3.2 quirk), (1, 2, 3) the clean variant (spec 7.3). May be empty.
        backend: "auto"/"torch" (vectorised PyTorch, the only implementation: the logits are tiny) or
            "reference" (one key row at a time, the oracle).

    Returns:
        0-dim loss, fp32 for fp16/bf16 inputs (computed in fp32), else the inputs' dtype. Gradients flow to clips,
        sents and a tensor temperature.
    """
    rolls = check_mtc_args(
        clips, sents, key_idx, value_idx, other_idx, temperature, rolls,
        check_value=not torch.compiler.is_compiling(),
    )
    if backend not in MTC_BACKENDS:
        raise ValueError(f"backend must be one of {MTC_BACKENDS}, got {backend!r}")
    if backend == "reference":
        from .backends.reference import temporal_contrastive_reference

        return temporal_contrastive_reference(
            clips, sents, key_idx, value_idx, other_idx, temperature, rolls=rolls
        )
    if clips.dtype in (torch.float16, torch.bfloat16):
        clips, sents = clips.float(), sents.float()
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=clips.device)
    key_idx, value_idx, other_idx = (t.long() for t in (key_idx, value_idx, other_idx))
    dist = (value_idx[:, None, :] - key_idx[:, :, None]).abs()  # (B, K, V)
    label = dist.argmin(-1)  # the first minimum
    keep = dist[..., 0] != dist[..., -1] if dist.shape[-1] >= 2 else torch.ones_like(label, dtype=torch.bool)
    args = (key_idx, value_idx, other_idx, rolls, temperature, label, keep)
    return _mtc_direction(clips, sents, *args) + _mtc_direction(sents, clips, *args)


def sample_mtc_indices(
    batch: int,
    clips: int,
    num_key: int = 2,
    num_value: int = 2,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw MTC's random clip positions with the official distribution (spec 3.2), independently per sample:
    the keys are the first `num_key` entries of a uniformly random permutation of 0..clips-1, the values the
    first `num_value` of a second, independent permutation, and the "other" position the first entry of a third.

    Args:
        batch: B >= 1; clips: M >= 1; 1 <= num_key, num_value <= M.
        generator: a torch.Generator (its device is where the draws happen) for reproducible draws.
        device: where the returned tensors go (default: the CPU).

    Returns:
        key_idx `(B, num_key)`, value_idx `(B, num_value)`, other_idx `(B,)`, all int64.

    For M = 4, K = V = 2 (the official setting) 1/12 of the key rows are ties (ignored), and the positive is at
    distance 0 / 1 / 2 from the key in 1/2, 1/3 and 1/12 of the rows.
    """
    for name, value, low in (("batch", batch, 1), ("clips", clips, 1), ("num_key", num_key, 1),
                             ("num_value", num_value, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if num_key > clips or num_value > clips:
        raise ValueError(
            f"num_key and num_value must be <= clips (distinct positions of a permutation): num_key={num_key}, "
            f"num_value={num_value}, clips={clips}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def perms():
        # argsort of i.i.d. uniform keys is a uniformly random permutation per row (fp64 keys: ties have
        # probability ~ M^2 / 2^53, negligible)
        keys = torch.rand((batch, clips), generator=generator, device=gen_device, dtype=torch.float64)
        return keys.argsort(dim=1)

    key_idx = perms()[:, :num_key]
    value_idx = perms()[:, :num_value]
    other_idx = perms()[:, 0]
    out_device = torch.device("cpu") if device is None else torch.device(device)
    return tuple(t.contiguous().to(out_device) for t in (key_idx, value_idx, other_idx))
