"""The C++ CPU kernel of htwa_attention (backend="cpp"): conformance in fp64 against both references, strided
inputs, reduced precisions, gradcheck, deterministic dbias, and the kernel's own argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from lfvila_kernels import htwa_attention
from lfvila_kernels.backends import cpp
from lfvila_kernels.reference import htwa_reference
from lfvila_kernels.shapes import official_cases

from tests.htwa_dense import htwa_dense

pytestmark = pytest.mark.skipif(
    not cpp.has_kernel("htwa_fwd", "cpu"), reason=f"C++ CPU kernel not built: {cpp.load_error()}"
)


def _nbias(bw):
    return (2 * bw[0] - 1) * (2 * bw[1] - 1) * (2 * bw[2] - 1)


def _inputs(B, grid, heads, D, bias_window, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid
    qkv = torch.randn(B, T, H, W, 3, heads, D, dtype=dtype, generator=g)
    table = torch.randn(_nbias(bias_window), heads, dtype=dtype, generator=g) if bias else None
    dout = torch.randn(B, T, H, W, heads, D, dtype=dtype, generator=g)
    return qkv, table, dout


def _run(fn, qkv, table, dout, **kw):
    """Output and gradients (qkv, bias table) of fn(q, k, v, table, **kw) with q, k, v strided views of qkv."""
    qkv = qkv.detach().clone().requires_grad_()
    table = None if table is None else table.detach().clone().requires_grad_()
    q, k, v = qkv.unbind(4)
    out = fn(q, k, v, table, **kw)
    inputs = [qkv] + ([table] if table is not None else [])
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach()] + [x.detach() for x in grads]


def _cpp(q, k, v, table, **kw):
    return htwa_attention(q, k, v, table, backend="cpp", **kw)


def _dense(q, k, v, table, *, window, shift, bias_window=None):
    return htwa_dense(q, k, v, table, window, shift, bias_window)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _assert_close(got, want, tol, names=("out", "dqkv", "dbias")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        err = _rel(a.double(), b.double())
        assert err <= tol, f"{name}: rel err {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------------------------------------------
# fp64 conformance


@pytest.mark.parametrize("case", official_cases(reduced=True), ids=lambda c: c.name)
def test_official_cases_fp64(case):
    B = 2 if case.layer == 0 else 1
    tokens = math.prod(case.grid)
    heads = min(case.heads, 8 if tokens <= 600 else 4)  # the dense reference is L x L: keep it small
    qkv, table, dout = _inputs(B, case.grid, heads, case.head_dim, case.bias_window, seed=case.layer)
    kw = dict(window=case.window, shift=case.shift, bias_window=case.bias_window)
    got = _run(_cpp, qkv, table, dout, **kw)
    _assert_close(got, _run(htwa_reference, qkv, table, dout, **kw), 1e-10)
    if tokens <= 1000:
        _assert_close(got, _run(_dense, qkv, table, dout, **kw), 1e-10)


# (B, grid, heads, D, window, shift, bias_window): ragged grids, shifts on every axis, the bias_window quirk,
# odd head dims (vector tails), window == grid, single-token boxes.
CONFIGS = [
    (2, (5, 7, 9), 3, 13, (2, 3, 4), (1, 2, 3), (2, 3, 4)),
    (1, (5, 7, 9), 2, 16, (2, 3, 4), (1, 2, 3), (3, 4, 6)),
    (3, (3, 5, 7), 1, 8, (3, 5, 7), (0, 0, 0), (4, 6, 8)),
    (1, (4, 4, 4), 2, 1, (1, 1, 1), (0, 0, 0), (1, 1, 1)),
    (2, (6, 5, 11), 4, 33, (3, 2, 5), (2, 1, 4), (3, 2, 5)),
    (1, (2, 9, 17), 2, 40, (2, 4, 8), (0, 3, 7), (2, 4, 8)),
    (1, (8, 6, 10), 2, 128, (4, 3, 5), (0, 1, 2), (4, 3, 5)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"B{c[0]}-g{'x'.join(map(str, c[1]))}-w{c[4]}-s{c[5]}")
def test_ragged_shifted_quirk_fp64(cfg):
    B, grid, heads, D, window, shift, bias_window = cfg
    qkv, table, dout = _inputs(B, grid, heads, D, bias_window, seed=sum(grid))
    kw = dict(window=window, shift=shift, bias_window=bias_window)
    got = _run(_cpp, qkv, table, dout, **kw)
    _assert_close(got, _run(_dense, qkv, table, dout, **kw), 1e-10)
    _assert_close(got, _run(htwa_reference, qkv, table, dout, **kw), 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_many_boxes_dense_bias_path(dtype, tol):
    # enough boxes per work chunk that the kernel uses its per-class dense bias / dbias blocks in both passes (in
    # fp32 the class's dS sums go into dbias 8 wide through the key runs; fp64 goes one element at a time)
    kw = dict(window=(2, 3, 5), shift=(0, 1, 2), bias_window=(2, 3, 5))
    qkv, table, dout = _inputs(2, (4, 12, 40), 2, 32, kw["bias_window"], seed=7)
    want = _run(_dense, qkv, table, dout, **kw)
    got = _run(_cpp, qkv.to(dtype), table.to(dtype), dout.to(dtype), **kw)
    _assert_close(got, want, tol)


def test_no_bias_fp64():
    kw = dict(window=(2, 3, 4), shift=(1, 1, 2))
    qkv, _, dout = _inputs(2, (5, 7, 9), 3, 16, kw["window"], seed=3, bias=False)
    got = _run(_cpp, qkv, None, dout, **kw)
    _assert_close(got, _run(_dense, qkv, None, dout, **kw), 1e-10, names=("out", "dqkv"))


def test_scale_argument_fp64():
    kw = dict(window=(2, 3, 4), shift=(0, 1, 2), scale=0.37)
    qkv, table, dout = _inputs(1, (4, 6, 8), 2, 16, kw["window"], seed=4)
    got = _run(_cpp, qkv, table, dout, **kw)
    _assert_close(got, _run(htwa_reference, qkv, table, dout, **kw), 1e-10)


# --------------------------------------------------------------------------------------------------------------
# strides


def test_arbitrary_strides_fp64():
    """q, k, v with unrelated strides (permuted storage, a sliced batch, padded head dim) give the same result as
    contiguous copies; a non-unit last stride is accepted too."""
    B, T, H, W, heads, D = 2, 4, 6, 10, 3, 8
    kw = dict(window=(2, 3, 5), shift=(1, 1, 2))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(W, heads, T, 2 * B, H, D + 3, dtype=torch.float64, generator=g)
    q = q.permute(3, 2, 4, 0, 1, 5)[::2, ..., :D]  # (B, T, H, W, heads, D), scattered storage
    k = torch.randn(B, T, H, W, D, heads, dtype=torch.float64, generator=g).transpose(-1, -2)  # last stride != 1
    v = torch.randn(B, heads, T, H, W, D, dtype=torch.float64, generator=g).permute(0, 2, 3, 4, 1, 5)
    table = torch.randn(_nbias(kw["window"]), heads, dtype=torch.float64, generator=g)
    dout = torch.randn(B, T, H, W, heads, D, dtype=torch.float64, generator=g)
    assert q.stride(-1) == 1 and k.stride(-1) != 1 and not v.is_contiguous()

    def grads(q, k, v):
        q, k, v, t = (x.detach().clone().requires_grad_() for x in (q, k, v, table))
        out = htwa_attention(q, k, v, t, backend="cpp", **kw)
        return [out] + list(torch.autograd.grad(out, (q, k, v, t), dout))

    got = grads(q, k, v)
    want = grads(q.contiguous(), k.contiguous(), v.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[0].is_contiguous()
    dense = htwa_dense(q, k, v, table, kw["window"], kw["shift"])
    assert _rel(got[0], dense) <= 1e-10


# --------------------------------------------------------------------------------------------------------------
# reduced precision


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_reduced_precision(dtype, tol):
    kw = dict(window=(2, 3, 5), shift=(0, 1, 2), bias_window=(2, 3, 5))
    qkv, table, dout = _inputs(2, (4, 6, 10), 4, 32, kw["bias_window"], seed=5)
    want = _run(htwa_reference, qkv, table, dout, **kw)
    qkv_l, dout_l = qkv.to(dtype), dout.to(dtype)
    table_l = table.float()  # the table stays fp32 (the op reads it in fp32)
    got = _run(_cpp, qkv_l, table_l, dout_l, **kw)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    _assert_close(got, want, tol)


@pytest.mark.parametrize("name", ["layer3", "layer5-shifted"])
def test_fp32_large_window(name):
    # layer3: 240-token boxes, dense per-class bias blocks in both passes (fp32 only: in fp64 the block exceeds the
    # budget) with dbias added row by row; layer5-shifted: 480-token boxes, bias rows from the reversed table
    case = [c for c in official_cases(reduced=True) if c.name == name][0]
    kw = dict(window=case.window, shift=case.shift, bias_window=case.bias_window)
    qkv, table, dout = _inputs(1, case.grid, 8, case.head_dim, case.bias_window, seed=9)
    want = _run(htwa_reference, qkv, table, dout, **kw)
    got = _run(_cpp, qkv.float(), table.float(), dout.float(), **kw)
    _assert_close(got, want, 2e-5)


def test_lse_is_logsumexp_of_box_logits():
    window, shift = [2, 3, 4], [1, 1, 2]
    qkv, _, _ = _inputs(2, (5, 7, 9), 2, 16, window, seed=12)
    q, k, v = qkv.unbind(4)
    scale = 0.3
    out, lse = torch.ops.lfvila_C.htwa_fwd(q, k, v, None, window, shift, window, scale)
    assert lse.shape == q.shape[:5] and lse.dtype == torch.float64 and out.dtype == torch.float64
    B, T, H, W, heads, D = q.shape
    coords = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")).flatten(1)
    group = torch.stack([torch.div(coords[a] - shift[a], window[a], rounding_mode="floor") for a in range(3)])
    same = (group[:, :, None] == group[:, None, :]).all(0)  # L x L
    qf, kf = (x.reshape(B, -1, heads, D).transpose(1, 2) for x in (q, k))
    logits = (scale * qf @ kf.transpose(-1, -2)).masked_fill(~same, float("-inf"))
    want = torch.logsumexp(logits, -1).transpose(1, 2).reshape(B, T, H, W, heads)
    assert torch.allclose(lse, want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# gradcheck, determinism


def test_gradcheck_fp64():
    kw = dict(window=(2, 2, 2), shift=(1, 0, 1), bias_window=(2, 2, 3))
    qkv, table, _ = _inputs(1, (2, 3, 3), 2, 3, kw["bias_window"], seed=13)
    q, k, v = (x.clone().requires_grad_() for x in qkv.unbind(4))
    table = table.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: htwa_attention(q, k, v, t, backend="cpp", **kw), (q, k, v, table), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_across_runs_and_threads(dtype):
    kw = dict(window=[2, 3, 5], shift=[0, 1, 2], bias_window=[2, 3, 5])
    qkv, table, dout = _inputs(2, (4, 12, 40), 4, 32, kw["bias_window"], dtype=torch.float32, seed=21)
    q, k, v = qkv.to(dtype).unbind(4)
    dout = dout.to(dtype)
    scale = 32**-0.5
    args = (kw["window"], kw["shift"], kw["bias_window"], scale)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            out, lse = torch.ops.lfvila_C.htwa_fwd(q, k, v, table, *args)
            results.append((out, lse) + tuple(torch.ops.lfvila_C.htwa_bwd(dout, q, k, v, table, out, lse, *args)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# the kernel's own checks (the Python layer validates first; direct calls must not crash either)


def test_kernel_checks_raise():
    q = torch.randn(1, 4, 6, 10, 2, 8)
    table = torch.randn(_nbias((2, 3, 5)), 2)
    op = torch.ops.lfvila_C.htwa_fwd
    with pytest.raises(RuntimeError, match="window"):
        op(q, q, q, table, [2, 3, 11], [0, 0, 0], [2, 3, 11], 1.0)
    with pytest.raises(RuntimeError, match="shift"):
        op(q, q, q, table, [2, 3, 5], [0, 3, 0], [2, 3, 5], 1.0)
    with pytest.raises(RuntimeError, match="bias_window"):
        op(q, q, q, table, [2, 3, 5], [0, 0, 0], [2, 2, 5], 1.0)
    with pytest.raises(RuntimeError, match="bias"):
        op(q, q, q, table[:-1], [2, 3, 5], [0, 0, 0], [2, 3, 5], 1.0)
    with pytest.raises(RuntimeError):
        op(q, q[..., :4], q, table, [2, 3, 5], [0, 0, 0], [2, 3, 5], 1.0)
    with pytest.raises(RuntimeError):
        op(q[0], q[0], q[0], table, [2, 3, 5], [0, 0, 0], [2, 3, 5], 1.0)
    out, lse = op(q, q, q, table, [2, 3, 5], [0, 0, 0], [2, 3, 5], 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.lfvila_C.htwa_bwd(out, q, q, q, table, out, lse[..., :1], [2, 3, 5], [0, 0, 0], [2, 3, 5], 1.0)
