"""The CUDA kernels of csrc/ run on the CPU through a small CUDA execution model (tests/cuda_emu/cuda_emu.h: each
block's threads are host threads meeting at real barriers) and are compared with the references.

It compiles a small torch extension first (about a minute here).
This validates the kernels' indexing, tiling, online softmax, reductions and barrier placement; it says nothing
about their speed, and a real GPU run (benchmarks/gpu_cuda.py) is still the final check."""

from __future__ import annotations

import os

import pytest
import torch

from lfvila_kernels.reference import htwa_reference


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    return load(
        name="lfvila_cuda_emu",
        sources=[os.path.join(ROOT, "tests", "cuda_emu", "emu_ops.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_emu")],
        extra_cflags=["-O2", "-w"],
        verbose=False,
    )


# (B, grid, window, shift, bias_window, heads, D): ragged, shifted, multi-tile boxes (> 64 tokens), D not a
# multiple of 4, the bias_window quirk, a single box.
HTWA_CASES = [
    (2, (3, 5, 6), (2, 3, 4), (1, 1, 2), (2, 3, 4), 2, 8),
    (1, (4, 7, 9), (4, 4, 5), (0, 2, 3), (4, 4, 5), 2, 20),
    (1, (2, 3, 5), (2, 3, 5), (0, 0, 0), (4, 3, 5), 3, 33),
    (1, (5, 4, 4), (3, 2, 3), (2, 1, 0), (3, 3, 3), 1, 70),
]


def _qkv(B, grid, heads, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, *grid, 3, heads, D, generator=gen).to(dtype)
    return qkv, qkv.unbind(4)


@pytest.mark.parametrize("case", HTWA_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_htwa_kernels_match_reference(emu, case, with_bias):
    B, grid, window, shift, bias_window, heads, D = case
    qkv, (q, k, v) = _qkv(B, grid, heads, D, torch.float32, 1)
    nb = (2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1)
    bias = torch.randn(nb, heads, generator=torch.Generator().manual_seed(2)) if with_bias else None
    scale = D ** -0.5
    out, lse = emu.htwa_fwd(q, k, v, bias, list(window), list(shift), list(bias_window), scale)

    qkv64 = qkv.double().requires_grad_(True)
    bias64 = bias.double().requires_grad_(True) if with_bias else None
    q64, k64, v64 = qkv64.unbind(4)
    ref = htwa_reference(q64, k64, v64, bias64, window=window, shift=shift, bias_window=bias_window, scale=scale)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(lse).all()

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ref.backward(dout.double())
    dq, dk, dv, dbias = emu.htwa_bwd(dout, q, k, v, bias, out, lse, list(window), list(shift), list(bias_window),
                                     scale, 3)
    gq, gk, gv = qkv64.grad.unbind(4)
    for got, want in ((dq, gq), (dk, gk), (dv, gv)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    if with_bias:
        torch.testing.assert_close(dbias.double(), bias64.grad, rtol=1e-4, atol=1e-4)
        # deterministic: bitwise equal on a rerun; and the chunk count only reorders the sums
        again = emu.htwa_bwd(dout, q, k, v, bias, out, lse, list(window), list(shift), list(bias_window), scale, 3)
        assert torch.equal(again[3], dbias)
        one = emu.htwa_bwd(dout, q, k, v, bias, out, lse, list(window), list(shift), list(bias_window), scale, 1)
        torch.testing.assert_close(one[3], dbias, rtol=1e-5, atol=1e-5)
    else:
        assert dbias.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_htwa_kernels_half_precision(emu, dtype):
    B, grid, window, shift, bias_window, heads, D = HTWA_CASES[1]
    qkv, (q, k, v) = _qkv(B, grid, heads, D, dtype, 4)
    nb = (2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1)
    bias = torch.randn(nb, heads, generator=torch.Generator().manual_seed(5))
    out, lse = emu.htwa_fwd(q, k, v, bias, list(window), list(shift), list(bias_window), D ** -0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q32, k32, v32 = (x.float() for x in (q, k, v))
    ref = htwa_reference(q32, k32, v32, bias, window=window, shift=shift, bias_window=bias_window)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def _naive_info_nce(a, b, scale, offset, symmetric):
    z = scale * a @ b.T
    n = a.shape[0]
    idx = torch.arange(n)
    pos = z[idx, idx + offset]
    loss = (torch.logsumexp(z, 1) - pos).mean()
    if symmetric:
        loss = loss + (torch.logsumexp(z, 0) - pos).mean()
    return loss, torch.logsumexp(z, 1), torch.logsumexp(z, 0)


@pytest.mark.parametrize(
    "n,m,d,offset,symmetric,max_splits,width",
    [
        (70, 70, 40, 0, True, 64, 64),     # N not a tile multiple, D not a chunk multiple, 2 stripes
        (130, 130, 17, 0, True, 2, 128),   # splits combined
        (50, 200, 33, 100, False, 64, 64),  # offset positives, M > N, 4 stripes
        (64, 64, 96, 0, False, 1, 512),
    ],
)
def test_info_nce_kernels_match_naive(emu, n, m, d, offset, symmetric, max_splits, width):
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(n, d, generator=gen)
    b = torch.randn(m, d, generator=gen)
    scale = 1 / 0.07 / d ** 0.5
    loss, lse_row, lse_col = emu.info_nce_fwd(a, b, scale, offset, symmetric, max_splits)
    a64 = a.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True)
    ref, ref_row, ref_col = _naive_info_nce(a64, b64, scale, offset, symmetric)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_row.double(), ref_row.detach(), rtol=1e-5, atol=1e-5)
    if symmetric:
        torch.testing.assert_close(lse_col.double(), ref_col.detach(), rtol=1e-5, atol=1e-5)
    else:
        assert lse_col.numel() == 0
    ref.backward(torch.tensor(1.5, dtype=torch.float64))
    da, db = emu.info_nce_bwd(torch.tensor(1.5), a, b, lse_row, lse_col, scale, offset, symmetric, width)
    torch.testing.assert_close(da.double(), a64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db.double(), b64.grad, rtol=1e-4, atol=1e-5)
    da2, db2 = emu.info_nce_bwd(torch.tensor(1.5), a, b, lse_row, lse_col, scale, offset, symmetric, width)
    assert torch.equal(da, da2) and torch.equal(db, db2)


def test_info_nce_kernels_bf16_extreme_logits(emu):
    gen = torch.Generator().manual_seed(7)
    a = (torch.randn(40, 24, generator=gen) * 100).to(torch.bfloat16)
    b = (torch.randn(40, 24, generator=gen) * 100).to(torch.bfloat16)
    loss, lse_row, lse_col = emu.info_nce_fwd(a, b, 100.0, 0, True, 64)
    ref, _, _ = _naive_info_nce(a.double(), b.double(), 100.0, 0, True)
    assert torch.isfinite(loss) and torch.isfinite(lse_row).all() and torch.isfinite(lse_col).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-2)
    da, db = emu.info_nce_bwd(torch.tensor(1.0), a, b, lse_row, lse_col, 100.0, 0, True, 64)
    assert torch.isfinite(da.float()).all() and torch.isfinite(db.float()).all()
