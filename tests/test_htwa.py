"""htwa_attention: every backend against the references, the op machinery (opcheck, compile), and bad input.

The oracle is `lfvila_kernels.reference.htwa_reference` (the official roll + partition + -100 mask path); it is
itself checked against `htwa_dense` (full L x L attention with the spec formulas), an independent second reference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfvila_kernels import htwa_attention, htwa_attention_qkv
from lfvila_kernels._checks import htwa_num_bias_rows
from lfvila_kernels.reference import htwa_reference
from lfvila_kernels.shapes import HTWACase, make_htwa_inputs, official_cases
from tests.htwa_dense import htwa_dense

CASES = official_cases(reduced=True)
CASE_IDS = [c.name for c in CASES]


def _grads(backend, case, batch=1, dtype=torch.float64, seed=0, with_bias=True, **kw):
    """Output and gradients (qkv, bias) for one backend, with a fixed non-unit upstream gradient."""
    qkv, (q, k, v), bias = make_htwa_inputs(case, batch, dtype, requires_grad=True, seed=seed, with_bias=with_bias)
    out = htwa_attention(q, k, v, bias, window=case.window, shift=case.shift, bias_window=case.bias_window,
                         backend=backend, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(dtype) * 0.5 + 0.25
    out.backward(dout)
    return out.detach(), qkv.grad, (bias.grad if with_bias else None)


def _rel_err(a, b):
    # Relative to the reference's norm, floored at 1: a gradient that is exactly zero (e.g. dbias when every
    # window holds one token, so each softmax row is the constant 1) is then held to an absolute tolerance.
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0)).item()


def _assert_close_all(got, want, tol):
    for name, g, w in zip(("out", "dqkv", "dbias"), got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        err = _rel_err(g, w)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


# ------------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_dense_official_cases(case):
    # -100 masking (official) against exact exclusion (dense): equal to 1e-6 on all 12 layer/shift cases.
    _, (q, k, v), bias = make_htwa_inputs(case, 1, torch.float64, seed=3)
    got = htwa_reference(q, k, v, bias, window=case.window, shift=case.shift, bias_window=case.bias_window)
    want = htwa_dense(q, k, v, bias, case.window, case.shift, case.bias_window)
    assert (got - want).abs().max().item() <= 1e-6


def test_official_cases_cover_every_layer_and_shift():
    assert len(CASES) == 12
    shifted = {c.layer: c.shift for c in CASES if c.shifted}
    assert shifted == {0: (0, 1, 2), 1: (0, 1, 2), 2: (0, 1, 2), 3: (0, 1, 2), 4: (0, 1, 2), 5: (0, 0, 0)}
    full = official_cases()
    assert [c.tokens for c in full[::2]] == [30720, 7680, 1920, 1920, 1920, 480]
    # windows per sample, spec 1.2: 1024, 128, 16, 8, 8, 1
    assert [math.prod(g // w for g, w in zip(c.grid, c.window)) for c in full[::2]] == [1024, 128, 16, 8, 8, 1]


def test_bias_window_quirk_uses_top_left_block_of_configured_index():
    # A 16-frame grid in a layer configured for 32 frames (spec 1.3): token n of the 16x3x5 window is read as
    # token n of the 32x3x5 window. Check one bias row by hand: query token n=15 (t=1, h=0, w=0 in the
    # effective window) against key n=0; in the configured geometry n=15 is also (1, 0, 0), so the row is the
    # dt=+1 row. Query n=20 -> (1,1,0) both ways. They agree because Wh, Ww are equal; shrink Wh to show a
    # difference: window (2, 2, 5), bias_window (2, 3, 5): n=10 is (1,0,0) in the window but (0,2,0) in bias.
    torch.manual_seed(0)
    case = HTWACase(0, False, (2, 2, 5), (2, 2, 5), (0, 0, 0), (2, 3, 5), heads=1, head_dim=4)
    _, (q, k, v), _ = make_htwa_inputs(case, 1, torch.float64, seed=1, with_bias=False)
    q = torch.zeros_like(q)  # uniform logits, so the output weights are exp(bias) normalised
    bias = torch.zeros(htwa_num_bias_rows((2, 3, 5)), 1, dtype=torch.float64)
    row_quirk = ((0 - 0 + 1) * 5 + (2 - 0 + 2)) * 9 + (0 - 0 + 4)  # (dt, dh, dw) = (0, +2, 0) in bias geometry
    bias[row_quirk, 0] = 5.0
    out = htwa_reference(q, k, v, bias, window=(2, 2, 5), bias_window=(2, 3, 5))
    weights = torch.ones(20, dtype=torch.float64)
    weights[0] = math.exp(5.0)  # query n=10 gets the boosted weight on key n=0 only (all 20 tokens, one window)
    want = (weights[:, None] * v[0].reshape(20, 4)).sum(0) / weights.sum()
    assert torch.allclose(out[0, 1, 0, 0, 0], want, atol=1e-12)
    dense = htwa_dense(q, k, v, bias, (2, 2, 5), (0, 0, 0), (2, 3, 5))
    assert torch.allclose(out, dense, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.layer in (0, 2, 5)], ids=lambda c: c.name)
def test_sdpa_backend_matches_reference(case):
    want = _grads("reference", case, batch=2, dtype=torch.float64)
    got = _grads("sdpa", case, batch=2, dtype=torch.float64)
    _assert_close_all(got, want, 1e-10)


def test_flex_backend_forward_matches_reference():
    case = next(c for c in CASES if c.layer == 0 and c.shifted)
    _, (q, k, v), bias = make_htwa_inputs(case, 2, torch.float32, seed=5)
    want = htwa_reference(q, k, v, bias, window=case.window, shift=case.shift)
    got = htwa_attention(q, k, v, bias, window=case.window, shift=case.shift, backend="flex")
    assert _rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------------ C++ backend


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpp_matches_reference_fp64_official_cases(case):
    want = _grads("reference", case, batch=2)
    got = _grads("cpp", case, batch=2)
    _assert_close_all(got, want, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_cpp_low_precision(dtype, tol):
    case = next(c for c in CASES if c.layer == 1 and c.shifted)
    want = _grads("reference", case, dtype=torch.float64)
    got = _grads("cpp", case, dtype=dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    _assert_close_all([g.double() for g in got], want, tol)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpp_fp32_official_cases(case):
    # fp32 takes vector paths fp64 does not: the 8-wide bias-row copies and dbias read-modify-writes over runs of
    # the reversed bias table (boxes too large for the dense per-class blocks: layers 3-5 here) and the dense blocks.
    want = _grads("reference", case, batch=2)
    got = _grads("cpp", case, batch=2, dtype=torch.float32)
    _assert_close_all([g.double() for g in got], want, 1e-5)


@pytest.mark.parametrize(
    "grid,window,shift,bias_window",
    [
        ((16, 8, 8), (16, 4, 4), (0, 2, 2), (16, 4, 4)),  # bias w-window 4: runs closer than 8 apart, scalar scatter
        ((8, 4, 18), (8, 2, 9), (0, 1, 4), (8, 2, 9)),  # w-window 9: runs cut into 8 + 1
        ((16, 6, 12), (8, 3, 6), (0, 1, 3), (10, 4, 7)),  # bias_window larger than the window (spec 1.3 quirk)
    ],
)
def test_cpp_fp32_large_boxes(grid, window, shift, bias_window):
    heads = 2
    case = HTWACase(0, any(shift), grid, window, shift, bias_window, heads, 32)
    want = _grads("reference", case, batch=1)
    got = _grads("cpp", case, batch=1, dtype=torch.float32)
    _assert_close_all([g.double() for g in got], want, 1e-5)


def test_auto_picks_cpp_on_cpu():
    case = CASES[0]
    _, (q, k, v), bias = make_htwa_inputs(case, 1, torch.float64, seed=2)
    a = htwa_attention(q, k, v, bias, window=case.window)
    b = htwa_attention(q, k, v, bias, window=case.window, backend="cpp")
    assert torch.equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grid=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 8)),
    data=st.data(),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 8, 16, 33, 64, 128]),
    batch=st.integers(1, 2),
    with_bias=st.booleans(),
)
def test_cpp_random_shapes_fp64(grid, data, heads, head_dim, batch, with_bias):
    window = tuple(data.draw(st.integers(1, g)) for g in grid)
    shift = tuple(data.draw(st.integers(0, w - 1)) for w in window)
    bias_window = tuple(w + data.draw(st.integers(0, 2)) for w in window)
    case = HTWACase(0, any(shift), grid, window, shift, bias_window, heads, head_dim)
    want = _grads("reference", case, batch=batch, with_bias=with_bias, seed=7)
    got = _grads("cpp", case, batch=batch, with_bias=with_bias, seed=7)
    dense = htwa_dense(*make_htwa_inputs(case, batch, torch.float64, seed=7, with_bias=with_bias)[1],
                       make_htwa_inputs(case, batch, torch.float64, seed=7, with_bias=with_bias)[2],
                       window, shift, bias_window)
    assert _rel_err(want[0], dense) <= 1e-10
    _assert_close_all(got, want, 1e-10)


def test_cpp_gradcheck_fp64():
    case = HTWACase(0, True, (3, 4, 5), (2, 3, 3), (1, 1, 2), (2, 3, 4), heads=2, head_dim=3)
    _, (q, k, v), bias = make_htwa_inputs(case, 1, torch.float64, seed=11)
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]

    def fn(q, k, v, bias):
        return htwa_attention(q, k, v, bias, window=case.window, shift=case.shift, bias_window=case.bias_window,
                              backend="cpp")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_cpp_dbias_is_deterministic():
    case = next(c for c in CASES if c.layer == 2 and c.shifted)
    first = _grads("cpp", case, batch=2, dtype=torch.float32)
    second = _grads("cpp", case, batch=2, dtype=torch.float32)
    assert torch.equal(first[2], second[2]) and torch.equal(first[1], second[1])


# ------------------------------------------------------------------------------------------------ op machinery


def _op_args(dtype=torch.float64, requires_grad=True):
    case = HTWACase(0, True, (2, 6, 10), (2, 3, 5), (0, 1, 2), (2, 3, 5), heads=2, head_dim=8)
    _, (q, k, v), bias = make_htwa_inputs(case, 1, dtype, seed=4, requires_grad=requires_grad)
    return case, q, k, v, bias


def test_opcheck_forward_and_backward_ops():
    case, q, k, v, bias = _op_args()
    args = (q, k, v, bias, list(case.window), list(case.shift), list(case.bias_window), 0.3, "cpp")
    torch.library.opcheck(torch.ops.lfvila.htwa_fwd.default, args)
    out, lse = torch.ops.lfvila.htwa_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), bias.detach(), out, lse, *args[4:])
    torch.library.opcheck(torch.ops.lfvila.htwa_bwd.default, bwd_args)
    no_bias = (q, k, v, None, *args[4:])
    torch.library.opcheck(torch.ops.lfvila.htwa_fwd.default, no_bias)


def test_torch_compile_fullgraph_cpu():
    case, q, k, v, bias = _op_args(torch.float32)

    def block(qkv, bias):
        q, k, v = qkv.unbind(4)
        return htwa_attention(q, k, v, bias, window=case.window, shift=case.shift).square().sum()

    qkv = torch.stack([q, k, v], 4).detach().requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(qkv, bias)
    loss.backward()
    qkv2 = qkv.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    ref = block(qkv2, bias2)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(qkv.grad, qkv2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(bias.grad, bias2.grad, rtol=1e-4, atol=1e-6)


def test_torch_compile_inductor_forward():
    case, q, k, v, bias = _op_args(torch.float32, requires_grad=False)
    fn = torch.compile(lambda q, k, v, b: htwa_attention(q, k, v, b, window=case.window, shift=case.shift) * 2,
                       fullgraph=True)
    want = htwa_attention(q, k, v, bias, window=case.window, shift=case.shift) * 2
    assert torch.allclose(fn(q, k, v, bias), want)


# ------------------------------------------------------------------------------------------------ bad input


def _good():
    q = torch.randn(1, 4, 6, 10, 2, 8)
    bias = torch.randn(htwa_num_bias_rows((2, 3, 5)), 2)
    return q, bias


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, r"q must have 6 dimensions"),
        (lambda a: a.update(k=torch.randn(1, 4, 6, 9, 2, 8)), ValueError, r"same shape.*k.shape=\(1, 4, 6, 9, 2, 8\)"),
        (lambda a: a.update(v=a["v"].double()), TypeError, r"q and v must have the same dtype"),
        (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), TypeError, r"q must have a floating dtype"),
        (lambda a: a.update(bias_table=torch.randn(134, 2)), ValueError, r"bias_table must have shape .*\(135, 2\)"),
        (lambda a: a.update(bias_table=torch.randn(135, 3)), ValueError, r"\(135, 2\).*\(135, 3\)"),
        (lambda a: a.update(window=(2, 3, 0)), ValueError, r"window must be positive.*\(2, 3, 0\)"),
        (lambda a: a.update(window=(8, 3, 5)), ValueError, r"window must not exceed the token grid.*\(4, 6, 10\)"),
        (lambda a: a.update(shift=(0, 3, 2)), ValueError, r"0 <= shift < window.*shift=\(0, 3, 2\)"),
        (lambda a: a.update(shift=(0, -1, 0)), ValueError, r"shift=\(0, -1, 0\)"),
        (lambda a: a.update(bias_window=(1, 3, 5)), ValueError, r"bias_window must be >= window"),
        (lambda a: a.update(window=(2, 3)), TypeError, r"window must be 3 ints"),
        (lambda a: a.update(scale=-1.0), ValueError, r"scale must be a finite positive"),
        (lambda a: a.update(scale="x"), TypeError, r"scale must be a float"),
        (lambda a: a.update(backend="cudnn"), ValueError, r"backend must be one of"),
        (lambda a: a.update(q=torch.randn(1, 4, 6, 10, 2, 129), k=torch.randn(1, 4, 6, 10, 2, 129),
                            v=torch.randn(1, 4, 6, 10, 2, 129)), ValueError, r"D .* <= 128, got 129"),
        (lambda a: a.update(q=torch.randn(0, 4, 6, 10, 2, 8), k=torch.randn(0, 4, 6, 10, 2, 8),
                            v=torch.randn(0, 4, 6, 10, 2, 8)), ValueError, r"no empty dimension"),
        (lambda a: a.update(bias_table=[1.0]), TypeError, r"bias_table must be a torch.Tensor"),
        (lambda a: a.update(k=torch.randn(1, 4, 6, 10, 2, 8, device="meta")), ValueError, r"same device"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_raises_clear_error(mutate, exc, match, backend):
    q, bias = _good()
    args = dict(q=q, k=q.clone(), v=q.clone(), bias_table=bias, window=(2, 3, 5), shift=(0, 1, 2), scale=None,
                backend=backend)
    mutate(args)
    with pytest.raises(exc, match=match):
        htwa_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("bias_table"), **args)


def test_explicit_backend_that_cannot_run_says_why():
    q, bias = _good()
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run: it runs on cuda tensors"):
        htwa_attention(q, q, q, bias, window=(2, 3, 5), backend="cuda")


# ------------------------------------------------------------------------------------------------ packed qkv


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_qkv_matches_unpacked(backend, with_bias):
    case = next(c for c in CASES if c.layer == 1 and c.shifted)
    want = _grads("reference", case, batch=2, with_bias=with_bias)
    qkv, _, bias = make_htwa_inputs(case, 2, torch.float64, requires_grad=True, seed=0, with_bias=with_bias)
    out = htwa_attention_qkv(qkv, bias, window=case.window, shift=case.shift, bias_window=case.bias_window,
                             backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).double()
    out.backward(dout * 0.5 + 0.25)
    _assert_close_all((out.detach(), qkv.grad, bias.grad if with_bias else None), want, 1e-10)


def test_opcheck_packed_ops():
    case, q, k, v, bias = _op_args()
    qkv = torch.stack([q, k, v], 4).detach().requires_grad_()
    params = (list(case.window), list(case.shift), list(case.bias_window), 0.3, "cpp")
    torch.library.opcheck(torch.ops.lfvila.htwa_fwd_qkv.default, (qkv, bias, *params))
    out, lse = torch.ops.lfvila.htwa_fwd_qkv(qkv.detach(), bias.detach(), *params)
    torch.library.opcheck(torch.ops.lfvila.htwa_bwd_packed.default,
                          (torch.randn_like(out), qkv.detach(), bias.detach(), out, lse, *params))


def test_packed_qkv_bad_shape():
    with pytest.raises(ValueError, match=r"qkv must be a \(B, T, H, W, 3, heads, D\) tensor, got \(1, 4, 6, 10, 2, 8\)"):
        htwa_attention_qkv(torch.randn(1, 4, 6, 10, 2, 8), window=(2, 3, 5))
