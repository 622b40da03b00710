"""One block of the model against a block written the official way (spec 1.3-1.4, 7.7, 7.8), in float64:
LayerNorm -> zero pad to window multiples -> cyclic roll -> window partition -> q k^T * scale + relative bias
(official index of the configured window, top-left N x N) + the -100 region mask -> softmax -> @ v -> reverse ->
roll back -> crop -> proj, residual, MLP. The official -100 mask differs from the op's exact exclusion by
< exp(-90) per softmax weight, far below the 1e-10 tolerance."""

import math

import pytest
import torch
import torch.nn.functional as F

from lfvila_model.config import VideoEncoderConfig
from lfvila_model.video_encoder import SwinBlock3D


def official_index(window):
    wt, wh, ww = window
    coords = [(t, h, w) for t in range(wt) for h in range(wh) for w in range(ww)]  # frame-major
    n = len(coords)
    idx = torch.empty(n, n, dtype=torch.long)
    for a, (t1, h1, w1) in enumerate(coords):
        for b, (t2, h2, w2) in enumerate(coords):
            idx[a, b] = ((t1 - t2 + wt - 1) * (2 * wh - 1) + (h1 - h2 + wh - 1)) * (2 * ww - 1) + (w1 - w2 + ww - 1)
    return idx


def partition(x, ws):
    B, T, H, W, C = x.shape
    x = x.view(B, T // ws[0], ws[0], H // ws[1], ws[1], W // ws[2], ws[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, math.prod(ws), C)


def reverse(x, ws, B, T, H, W):
    x = x.view(B, T // ws[0], H // ws[1], W // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, -1)


def region_mask(Tp, Hp, Wp, ws, shift):
    img = torch.zeros(1, Tp, Hp, Wp, 1)
    cnt = 0
    slices = [[slice(0, -w), slice(-w, -s), slice(-s, None)] if s else [slice(None)] for w, s in zip(ws, shift)]
    for t in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                img[:, t, h, w] = cnt
                cnt += 1
    win = partition(img, ws).squeeze(-1)  # nW, N
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0)).double()


def official_block(blk: SwinBlock3D, x: torch.Tensor) -> torch.Tensor:
    B, T, H, W, C = x.shape
    cfg_ws = blk.window
    ws = tuple(min(g, w) for g, w in zip((T, H, W), cfg_ws))  # get_window_size
    shift = (0, cfg_ws[1] // 2, cfg_ws[2] // 2) if blk.shifted else (0, 0, 0)
    shift = tuple(s if g > w else 0 for s, g, w in zip(shift, (T, H, W), cfg_ws))
    attn = blk.attn
    heads, d = attn.num_heads, attn.head_dim
    shortcut = x
    y = blk.norm1(x)
    pt, ph, pw = ((-n) % w for n, w in zip((T, H, W), ws))
    y = F.pad(y, (0, 0, 0, pw, 0, ph, 0, pt))
    Tp, Hp, Wp = y.shape[1:4]
    if any(shift):
        y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    win = partition(y, ws)  # B*nW, N, C
    n = win.shape[1]
    qkv = attn.qkv(win).reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1)
    index = official_index(cfg_ws)[:n, :n]  # the configured window's index, top-left block (spec 1.3 quirk)
    bias = attn.relative_position_bias_table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
    logits = logits + bias[None]
    if any(shift):
        mask = region_mask(Tp, Hp, Wp, ws, shift)
        nw = mask.shape[0]
        logits = logits.view(-1, nw, heads, n, n) + mask[None, :, None]
        logits = logits.view(-1, heads, n, n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, C)
    out = attn.proj(out)
    out = reverse(out, ws, B, Tp, Hp, Wp)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    out = out[:, :T, :H, :W]
    x = shortcut + out
    return x + blk.mlp(blk.norm2(x))


CASES = [
    # grid (T, H, W), configured window, shifted, dim, heads
    ((4, 6, 10), (2, 3, 5), True, 64, 2),  # shifted, divisible
    ((4, 6, 10), (2, 3, 5), False, 64, 2),
    ((3, 7, 11), (4, 3, 5), True, 64, 2),  # window clipped in time (bias quirk) and ragged H, W (zero padding)
    ((6, 3, 5), (8, 3, 5), True, 32, 1),  # window covers the grid: no shift, clipped temporal window
]


@pytest.mark.parametrize("grid,window,shifted,dim,heads", CASES)
def test_block_equals_official_block_fp64(grid, window, shifted, dim, heads):
    torch.manual_seed(0)
    cfg = VideoEncoderConfig()
    blk = SwinBlock3D(dim, heads, window, shifted, mlp_ratio=4.0, qkv_bias=True, drop=0.0, drop_path=0.0,
                      backend="reference", ragged_windows="pad").double().eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_(0, 1.0)  # large bias: any index error shows
        for ln in (blk.norm1, blk.norm2):
            ln.weight.normal_(1.0, 0.3)
            ln.bias.normal_(0.0, 0.3)
        blk.attn.qkv.bias.normal_(0.0, 0.5)  # padded tokens' keys = this bias: must match the official padding
    x = torch.randn(2, *grid, dim, dtype=torch.float64)
    want = official_block(blk, x)
    got = blk(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_native_ragged_windows_differ_from_official_padding():
    # "native" ragged windows exclude the padding as keys: a different function on ragged grids (spec 7.10),
    # equal on divisible ones
    torch.manual_seed(1)
    blk = SwinBlock3D(32, 1, (2, 3, 5), True, 4.0, True, 0.0, 0.0, "reference", "pad").double().eval()
    with torch.no_grad():
        blk.attn.qkv.bias.normal_(0.0, 1.0)
    x = torch.randn(1, 2, 7, 11, 32, dtype=torch.float64)
    padded = blk(x)
    blk.ragged_windows = "native"
    assert (blk(x) - padded).abs().max() > 1e-6
    x = torch.randn(1, 2, 6, 10, 32, dtype=torch.float64)
    blk.ragged_windows = "pad"
    a = blk(x)
    blk.ragged_windows = "native"
    torch.testing.assert_close(blk(x), a, rtol=0, atol=1e-12)


def test_drop_path_residual_by_hand():
    # residual(shortcut, x) = shortcut + x * mask / keep per sample, one addcmul; the same draws as forward()
    from lfvila_model.video_encoder import DropPath

    dp = DropPath(0.5).train()
    shortcut = torch.randn(16, 3, 4, dtype=torch.float64)
    x = torch.randn(16, 3, 4, dtype=torch.float64)
    torch.manual_seed(3)
    got = dp.residual(shortcut, x)
    torch.manual_seed(3)
    branch = dp(x)
    kept = [i for i in range(16) if branch[i].abs().sum() > 0]
    assert 0 < len(kept) < 16  # some samples dropped, some kept
    for i in range(16):
        want = shortcut[i] + (x[i] / 0.5 if i in kept else 0.0)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-15)
        torch.testing.assert_close(branch[i], x[i] / 0.5 if i in kept else torch.zeros_like(x[i]), rtol=0, atol=0)
    dp.eval()
    torch.testing.assert_close(dp.residual(shortcut, x), shortcut + x, rtol=0, atol=0)
