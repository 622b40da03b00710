"""In-kernel HTWA geometry of the Triton kernels (the launch side uses lfvila_kernels/geometry.py, the same
facts; csrc/htwa_geometry.h is the C++ copy). Contract: csrc/HTWA_CONTRACT.md.

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
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _box(j, L, O, WN):
    """Box j along one axis: (start, length, c0), c0 = in-window coordinate of its first token."""
    o = j * WN + O
    start = tl.maximum(o, 0)
    length = tl.minimum(o + WN, L) - start
    return start, length, start - o


@triton.jit
def window_box(box, T, H, W, OT, OH, OW, NBH, NBW, WT, WH, WW):
    """Box `box` of the grid (t-major, NBH x NBW boxes per frame slab): its first token (t0, h0, w0), its extent
    along h and w (lh, lw), the in-window coordinates of its first token (ct, ch, cw) and its token count nb."""
    t0, lt, ct = _box(box // (NBH * NBW), T, OT, WT)
    h0, lh, ch = _box((box // NBW) % NBH, H, OH, WH)
    w0, lw, cw = _box(box % NBW, W, OW, WW)
    return t0, h0, w0, lh, lw, ct, ch, cw, lt * lh * lw


@triton.jit
def decode_token(idx, t0, h0, w0, lh, lw, ct, ch, cw,
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
def token_offset(tt, hh, ww, st, sh, sw):
    """int64 element offsets of tokens (tt, hh, ww) through the frame/row/column strides."""
    return tt * st + hh * sh + ww * sw


@triton.jit
def head_token_offset(b, head, tt, hh, ww, sb, sn, st, sh, sw):
    """int64 element offsets of tokens (tt, hh, ww) of batch b and head `head` in a (B, T, H, W, heads, ...) tensor
    with strides (sb, st, sh, sw, sn); a token's D elements follow at unit stride."""
    return (b.to(tl.int64) * sb + head * sn) + token_offset(tt, hh, ww, st, sh, sw)


@triton.jit
def query_bias_offset(r_q, head, BT, BH: tl.constexpr, BW: tl.constexpr):
    """Query side of the bias offset into the TRANSPOSED table (heads, nbias): (head, row) -> head * nbias + row
    = bq - R_k with bq = head * nbias + R_q + R0, so a tile costs one 2D subtraction (module docstring). Keys
    adjacent along w read adjacent table entries (R_k + 1), so a warp's gather is coalesced; in the (nbias,
    heads) layout they were `heads` entries apart, one memory sector per lane."""
    R0 = ((BT - 1) * (2 * BH - 1) + (BH - 1)) * (2 * BW - 1) + (BW - 1)
    nbias = (2 * BT - 1) * (2 * BH - 1) * (2 * BW - 1)
    return head * nbias + (r_q + R0)
