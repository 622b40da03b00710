"""Plain-PyTorch reference implementations: the oracles every backend is tested against and the "naive"
baselines every benchmark compares with.

`htwa_reference` does literally what LF-VILA's official video encoder does around its window attention
(spec sections 1.3-1.4): zero-pad the grid to window multiples, cyclic roll by -shift, partition into windows,
scaled q @ k^T, relative position bias gathered from the official index buffer (built for the configured
`bias_window` and cut to the effective window, which is the official quirk), the -100 region mask of shifted
windows, softmax, @ v, reverse partition and roll back. Keys that are grid padding are excluded, which is the
op's ragged-window semantics (the official model pads *before* the qkv projection instead; spec 7.8).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_htwa_args

_OFFICIAL_MASK_VALUE = -100.0


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """The official `relative_position_index` buffer for a (Wt, Wh, Ww) window: (N, N) int64, N = Wt*Wh*Ww,
    tokens flattened frame-major, row of (query - key) offsets with the temporal offset slowest."""
    wt, wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij")
    ).flatten(1)  # 3, N
    rel = coords[:, :, None] - coords[:, None, :]  # 3, N, N (query - key)
    rel[0] += wt - 1
    rel[1] += wh - 1
    rel[2] += ww - 1
    return (rel[0] * (2 * wh - 1) + rel[1]) * (2 * ww - 1) + rel[2]


def _region_labels(length: int, window: int, shift: int, device) -> torch.Tensor:
    """Swin's compute_mask slices along one axis of the rolled, padded grid: 0 / 1 / 2 for the slices
    (0, -W), (-W, -s), (-s, None). With shift 0 the last slice covers the whole axis, so every label is equal."""
    r = torch.arange(length, device=device)
    if shift == 0:
        return torch.zeros(length, dtype=torch.long, device=device)
    return (r >= length - window).long() + (r >= length - shift).long()


def _partition(x: torch.Tensor, window) -> torch.Tensor:
    """(B, Tp, Hp, Wp, C...) -> (B * nW, N, C...) windows, frame-major inside a window."""
    B, Tp, Hp, Wp = x.shape[:4]
    rest = x.shape[4:]
    wt, wh, ww = window
    x = x.reshape(B, Tp // wt, wt, Hp // wh, wh, Wp // ww, ww, *rest)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(rest)))
    return x.reshape(-1, wt * wh * ww, *rest)


def _reverse(x: torch.Tensor, window, B: int, Tp: int, Hp: int, Wp: int) -> torch.Tensor:
    wt, wh, ww = window
    rest = x.shape[2:]
    x = x.reshape(B, Tp // wt, Hp // wh, Wp // ww, wt, wh, ww, *rest)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + len(rest)))
    return x.reshape(B, Tp, Hp, Wp, *rest)


def window_prepare(q, k, v, window, shift):
    """Official pre-attention path: zero-pad the grid to window multiples, roll by -shift, partition.
    Returns (qw, kw, vw) as (B * nW, heads, N, D) and the padded grid (Tp, Hp, Wp)."""
    B, T, H, W = q.shape[:4]
    wt, wh, ww = window
    padded = (math.ceil(T / wt) * wt, math.ceil(H / wh) * wh, math.ceil(W / ww) * ww)
    if padded != (T, H, W):
        pad = (0, 0, 0, 0, 0, padded[2] - W, 0, padded[1] - H, 0, padded[0] - T)
        q, k, v = (F.pad(x, pad) for x in (q, k, v))
    if any(shift):
        q, k, v = (torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3)) for x in (q, k, v))
    qw, kw, vw = (_partition(x, window).transpose(1, 2) for x in (q, k, v))
    return qw, kw, vw, padded


def window_additive_mask(bias_table, grid, padded, window, shift, bias_window, heads, dtype, device):
    """The dense additive term of the official logits for every window: relative position bias (from the
    official index buffer of `bias_window`, cut to the effective window), -100 between regions of a shifted
    window, and the most negative finite value for keys that are grid padding.
    Returns (1 or nW, heads or 1, N, N), or None when there is nothing to add."""
    N = window[0] * window[1] * window[2]
    term = None
    if bias_table is not None:
        index = relative_position_index(bias_window)[:N, :N].to(device)  # the official top-left block
        term = bias_table[index.reshape(-1)].reshape(N, N, heads).permute(2, 0, 1).to(dtype).unsqueeze(0)
    if any(shift):
        labels = [_region_labels(n, w, s, device) for n, w, s in zip(padded, window, shift)]
        region = labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]
        rw = _partition(region[None, ..., None], window)[..., 0]  # (nW, N)
        mask = (rw[:, :, None] != rw[:, None, :]).to(dtype) * _OFFICIAL_MASK_VALUE
        term = mask[:, None] if term is None else term + mask[:, None]
    if tuple(padded) != tuple(grid):
        # grid padding never acts as a key: ragged windows (a finite fill keeps all-padding rows NaN-free)
        coords = [torch.arange(n, device=device) for n in padded]
        real = [((c + s) % n) < L for c, s, n, L in zip(coords, shift, padded, grid)]
        real_grid = real[0][:, None, None] & real[1][None, :, None] & real[2][None, None, :]
        key_ok = _partition(real_grid[None, ..., None], window)[..., 0]  # (nW, N)
        fill = torch.zeros(key_ok.shape, dtype=dtype, device=device)
        fill = fill.masked_fill(~key_ok, torch.finfo(dtype).min)[:, None, None, :]
        # clamp so that adding the fill to the bias cannot overflow to -inf
        term = fill if term is None else (term + fill).clamp_min(torch.finfo(dtype).min)
    return term


def window_finish(out, window, shift, grid, padded):
    """(B * nW, heads, N, D) window outputs -> (B, T, H, W, heads, D): reverse partition, roll back, crop."""
    B = out.shape[0] // ((padded[0] // window[0]) * (padded[1] // window[1]) * (padded[2] // window[2]))
    out = _reverse(out.transpose(1, 2), window, B, *padded)
    if any(shift):
        out = torch.roll(out, shifts=tuple(shift), dims=(1, 2, 3))
    if tuple(padded) != tuple(grid):
        out = out[:, : grid[0], : grid[1], : grid[2]]
    return out.contiguous()


def htwa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: Optional[torch.Tensor] = None,
    *,
    window,
    shift=(0, 0, 0),
    bias_window=None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Naive HTWA, the official way. Same arguments and result as `lfvila_kernels.htwa_attention`."""
    window, shift, bias_window, scale = check_htwa_args(q, k, v, bias_table, window, shift, bias_window, scale)
    B, T, H, W, heads, D = q.shape
    qw, kw, vw, padded = window_prepare(q, k, v, window, shift)
    attn = (qw * scale) @ kw.transpose(-2, -1)  # (B*nW, heads, N, N)
    term = window_additive_mask(bias_table, (T, H, W), padded, window, shift, bias_window, heads, attn.dtype, q.device)
    if term is not None:  # (1 or nW, heads or 1, N, N) broadcasts over the batch
        attn = (attn.view(B, -1, *attn.shape[1:]) + term).view(attn.shape)
    attn = attn.softmax(dim=-1)
    return window_finish(attn @ vw, window, shift, (T, H, W), padded)


# --------------------------------------------------------------------------------------------------------------
# Contrastive losses (spec section 3): the naive versions. `info_nce_reference` materialises the full logit
# matrix (the baseline the fused kernels are benchmarked against); `temporal_contrastive_reference` walks the
# key rows one by one, spelling out spec 3.2 literally. Both are oracles for the tests of lfvila_kernels.losses.


def info_nce_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature,
    *,
    symmetric: bool = True,
    offset: int = 0,
) -> torch.Tensor:
    """Naive InfoNCE: logits = a @ b^T / temperature ((N, M), stored), positive of row i is column i + offset.

    Returns CE_rows (mean over the N rows) plus, when `symmetric`, CE_cols (mean over the columns of the N x N
    matrix; needs N == M and offset == 0): the sum of the two directions, as LF-VILA's VPC loss (spec 3.1).
    Same dtype arithmetic as the official code (the logits are in the inputs' dtype).
    """
    logits = (a @ b.transpose(0, 1)) / temperature
    labels = torch.arange(a.shape[0], device=a.device) + offset
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = loss + F.cross_entropy(logits.transpose(0, 1), labels)
    return loss


def temporal_contrastive_reference(
    clips: torch.Tensor,
    sents: torch.Tensor,
    key_idx: torch.Tensor,
    value_idx: torch.Tensor,
    other_idx: torch.Tensor,
    temperature,
    *,
    rolls=(0, 1, 2),
) -> torch.Tensor:
    """Naive MTC loss (spec 3.2), one key row at a time: for direction A -> B and key (i, k) the candidates are
    B[i, v_1..v_V] followed by B[(i - r) mod batch, other_idx[(i - r) mod batch]] for r in `rolls`; the label is
    the first value nearest in time to the key position; a row whose first and last value distances are equal
    is ignored. Each direction is the mean CE over its kept rows (0 when none is kept); the two are summed."""
    batch = clips.shape[0]
    total = clips.new_zeros(())
    for A, Bf in ((clips, sents), (sents, clips)):
        terms = []
        for i in range(batch):
            for k in key_idx[i].tolist():
                dist = [abs(v - k) for v in value_idx[i].tolist()]
                if len(dist) >= 2 and dist[0] == dist[-1]:
                    continue  # tie: label -100 in the official code
                label = dist.index(min(dist))
                cands = [Bf[i, v] for v in value_idx[i].tolist()]
                for r in rolls:
                    j = (i - r) % batch
                    cands.append(Bf[j, int(other_idx[j])])
                logits = torch.stack([A[i, k] @ c for c in cands]) / temperature
                terms.append(torch.logsumexp(logits, 0) - logits[label])
        if terms:
            total = total + torch.stack(terms).mean()
    return total
