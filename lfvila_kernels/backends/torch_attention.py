"""HTWA through stock PyTorch attention kernels: the `sdpa` and `flex` backends of `htwa_attention`.

Both are baselines as much as backends: they are what a user would write with torch alone.
- `sdpa`: the official pad + roll + window partition, then `scaled_dot_product_attention` with the bias and the
  region/padding mask as one dense float mask per window (partition cost included), then the reverse.
- `flex`: FlexAttention over the whole grid, tokens permuted into window order so blocks are dense, the bias as a
  `score_mod` (row from the in-window coordinates) and the windows as a block mask. Forward on the CPU; its
  backward needs a GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import geometry
from .._checks import check_htwa_args
from ..reference import window_additive_mask, window_finish, window_prepare


def can_run_sdpa(device: torch.device, dtype: torch.dtype, raise_error: bool = False) -> bool:
    """`scaled_dot_product_attention` runs wherever torch does."""
    return True


def can_run_flex(device: torch.device, dtype: torch.dtype, raise_error: bool = False) -> bool:
    """FlexAttention (torch.nn.attention.flex_attention) runs its forward on any device torch compiles for; its
    backward needs a GPU (torch's own error says so)."""
    return True


def htwa_sdpa(q, k, v, bias_table=None, *, window, shift=(0, 0, 0), bias_window=None, scale=None):
    window, shift, bias_window, scale = check_htwa_args(q, k, v, bias_table, window, shift, bias_window, scale)
    B, T, H, W, heads, D = q.shape
    qw, kw, vw, padded = window_prepare(q, k, v, window, shift)
    term = window_additive_mask(bias_table, (T, H, W), padded, window, shift, bias_window, heads, q.dtype, q.device)
    if term is not None and term.shape[0] > 1:  # per-window masks: repeat over the batch (B * nW windows)
        term = term.unsqueeze(0).expand(B, *term.shape).reshape(-1, *term.shape[1:])
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=term, scale=scale)
    return window_finish(out, window, shift, (T, H, W), padded)


@functools.lru_cache(maxsize=32)
def _flex_layout(grid, window, shift, bias_window, device):
    """Window-order permutation of the grid tokens, each token's window id and its bias key A (geometry.py: the
    bias row of (query, key) is C + A_q - A_k)."""
    axes = [torch.arange(n, device=device) for n in grid]
    groups, coords = [], []
    for x, w, s in zip(axes, window, shift):
        g = torch.div(x - s, w, rounding_mode="floor")
        groups.append(g - g.min())
        coords.append(x - s - w * g)
    t, h, w_ = torch.meshgrid(groups[0], groups[1], groups[2], indexing="ij")
    ng = [int(g.max()) + 1 for g in groups]
    gid = ((t * ng[1] + h) * ng[2] + w_).reshape(-1)
    ct, ch, cw = (c.reshape(-1) for c in torch.meshgrid(*coords, indexing="ij"))
    n = (ct * window[1] + ch) * window[2] + cw  # flat in-window index, window geometry
    order = torch.argsort(gid * (window[0] * window[1] * window[2]) + n)  # window-major token order
    return order, gid[order].contiguous(), geometry.bias_key(n, bias_window)[order].contiguous()


def htwa_flex(q, k, v, bias_table=None, *, window, shift=(0, 0, 0), bias_window=None, scale=None):
    window, shift, bias_window, scale = check_htwa_args(q, k, v, bias_table, window, shift, bias_window, scale)
    B, T, H, W, heads, D = q.shape
    L = T * H * W
    order, gid, akey = _flex_layout((T, H, W), window, shift, bias_window, q.device)
    center = geometry.bias_center(bias_window)

    def mask_mod(b, h, qi, ki):
        return gid[qi] == gid[ki]

    score_mod = None
    if bias_table is not None:
        table = bias_table.to(torch.float32)

        def score_mod(score, b, h, qi, ki):
            return score + table[center + akey[qi] - akey[ki], h]

    block_mask = _block_mask((T, H, W), window, shift, bias_window, q.device, mask_mod)
    qf, kf, vf = (x.reshape(B, L, heads, D)[:, order].transpose(1, 2) for x in (q, k, v))
    out = _compiled_flex()(qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(L, device=q.device)
    return out.transpose(1, 2)[:, inverse].reshape(B, T, H, W, heads, D).contiguous()


_BLOCK_MASKS: dict = {}


def _block_mask(grid, window, shift, bias_window, device, mask_mod):
    # Building a block mask scans the whole L x L mask: do it once per geometry.
    from torch.nn.attention.flex_attention import create_block_mask

    key = (grid, window, shift, bias_window, str(device))
    if key not in _BLOCK_MASKS:
        L = grid[0] * grid[1] * grid[2]
        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, L, L, device=device)
    return _BLOCK_MASKS[key]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the whole score matrix; compiled, it runs block-sparse kernels.
    return torch.compile(flex_attention, dynamic=False)
