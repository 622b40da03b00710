"""The "chunked" InfoNCE backend (lfvila_kernels/backends/chunked.py: a in row panels, one GEMM per panel)
against the fp64 reference, on the CPU. Most tests shrink the panel budget so that a few dozen rows already span
several panels, the last one ragged; the distributed mode is covered in test_losses_dist.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lfvila_kernels.backends import chunked
from lfvila_kernels import info_nce_loss
from lfvila_kernels.reference import info_nce_reference
from tests.helpers import loss_and_grads, offset_rows_case, unit_features

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

ROWS = 64  # the smallest panel: what choose_panel_rows gives under the tiny budget below


@pytest.fixture
def small_panels(monkeypatch):
    """A 1-byte budget: every panel is the minimum 64 rows."""
    monkeypatch.setattr(chunked, "PANEL_BUDGET_BYTES", 1)


_features = unit_features
_run = loss_and_grads


def _rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-300)).item()


@pytest.mark.parametrize("n,d", [(1, 1), (37, 20), (64, 8), (200, 33), (513, 70)], ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "rows"])
def test_chunked_fp64_matches_reference(small_panels, n, d, symmetric):
    """Loss and the gradients of a, b and temperature through info_nce_loss; N below, at and across the 64-row
    panel (200 = 3 panels + 8 rows, 513 = 8 panels + 1 row)."""
    a, b = _features(n, d, seed=n + d)
    t = torch.tensor(0.07, dtype=torch.float64)
    got = _run(info_nce_loss, a, b, t, 1.7, symmetric=symmetric, backend="chunked")
    ref = _run(info_nce_reference, a, b, t, 1.7, symmetric=symmetric)
    assert [g.dtype for g in got] == [torch.float64] * 4
    for name, g, r in zip(("loss", "da", "db", "dtemperature"), got, ref):
        assert _rel_err(g, r) <= 1e-10, name


@pytest.mark.parametrize("n,m,offset", [(70, 300, 150), (1, 400, 399), (130, 260, 130), (5, 5, 0)])
def test_chunked_offset_rows(small_panels, n, m, offset):
    """The op's rectangular form that the distributed mode uses: rows of a against all of b (M > N), positive of
    row i at column i + offset; panels of 64 rows."""
    (loss, lse_row, lse_col, da, db), (ref, rda, rdb), lse_ref = offset_rows_case("chunked", n, m, offset)
    assert lse_col.shape == (0,)
    assert _rel_err(loss, ref) <= 1e-10
    assert _rel_err(lse_row, lse_ref) <= 1e-12
    assert _rel_err(da, rda) <= 1e-10 and _rel_err(db, rdb) <= 1e-10


def test_chunked_saved_lse_are_row_and_column_logsumexp(small_panels):
    """The column LSE is combined over 5 panels (running logaddexp) and still equals logsumexp(z, 0)."""
    a, b = _features(300, 17, seed=3)
    _, lse_row, lse_col = torch.ops.lfvila.info_nce_fwd(a, b, torch.tensor(0.2, dtype=torch.float64), 0, True,
                                                        "chunked")
    z = a @ b.T / 0.2
    torch.testing.assert_close(lse_row, torch.logsumexp(z, 1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse_col, torch.logsumexp(z, 0), atol=1e-12, rtol=1e-12)


# tolerance relative to each output's max, per dtype; the reference sees the same (rounded) inputs in fp64, so
# only the backend's own rounding counts (fp32 accumulation; 16-bit gradients are rounded to 8 / 11 bits)
_LOW_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", list(_LOW_TOL), ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "rows"])
def test_chunked_low_precision(small_panels, dtype, symmetric):
    a, b = _features(150, 40, seed=5)
    a, b = a.to(dtype), b.to(dtype)
    t = torch.tensor(0.05, dtype=torch.float64)
    got = _run(info_nce_loss, a, b, t, 1.3, symmetric=symmetric, backend="chunked")
    ref = _run(info_nce_reference, a.double(), b.double(), t, 1.3, symmetric=symmetric)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    # the loss is an fp32 sum of fp32 logits; dtemperature = -(1/t) sum a . da reads the 16-bit da, but its
    # rounding errors mostly cancel in the sum
    assert _rel_err(got[0], ref[0]) <= 1e-5
    assert _rel_err(got[3], ref[3]) <= (1e-3 if dtype != torch.float32 else 2e-5)
    tol = _LOW_TOL[dtype]
    for name, g, r in zip(("da", "db"), got[1:3], ref[1:3]):
        torch.testing.assert_close(g.double(), r, atol=tol * r.abs().max().item(), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


def test_chunked_deterministic(small_panels):
    """db is summed over 4 panels in a fixed order: two backward calls are bitwise equal."""
    a, b = _features(230, 48, seed=11)
    a, b = a.float(), b.float()
    t = torch.tensor(0.05)
    first = _run(info_nce_loss, a, b, t, 1.0, backend="chunked")
    again = _run(info_nce_loss, a, b, t, 1.0, backend="chunked")
    for g, h in zip(first, again):
        assert torch.equal(g, h)


def test_chunked_panel_size_does_not_change_results():
    """Several 64-row panels (tiny budget) vs one panel (default budget): equal up to fp64 rounding."""
    a, b = _features(200, 16, seed=7)
    t = torch.tensor(0.1, dtype=torch.float64)
    assert chunked.choose_panel_rows(200, 200, torch.float64) == 200
    assert chunked.choose_panel_rows(200, 200, torch.float64, budget_bytes=1) == ROWS
    one = _run(info_nce_loss, a, b, t, 1.0, backend="chunked")
    many = [None] * 4
    many[0], lse_row, lse_col = chunked.info_nce_fwd_chunked(a, b, t, 0, True, panel_rows=ROWS)
    many[1:3] = chunked.info_nce_bwd_chunked(torch.tensor(1.0, dtype=torch.float64), a, b, t, lse_row, lse_col,
                                             0, True, panel_rows=ROWS)
    for g, h in zip(one[:3], many[:3]):
        torch.testing.assert_close(h, g, atol=1e-13, rtol=1e-13)


def test_choose_panel_rows():
    mib = 2**20
    # 256 MiB / (3 x 65536 x 4 bytes) = 341 rows -> 320, a multiple of 64
    assert chunked.choose_panel_rows(65536, 65536, torch.float32) == 320
    assert chunked.choose_panel_rows(65536, 65536, torch.float64) == 128  # 8-byte accumulation: half the rows
    assert chunked.choose_panel_rows(65536, 65536, torch.float32, budget_bytes=mib) == 64  # never below 64
    assert chunked.choose_panel_rows(100, 100, torch.float32) == 100  # never above N
    assert chunked.choose_panel_rows(1, 10**9, torch.float32) == 1


def test_fp32_output_gemm_capability_matches_what_runs():
    """The dispatcher's answer agrees with a real call on the CPU: no fp32-output 16-bit GEMM there, so the 16-bit
    inputs take the upcast path."""
    assert chunked._has_fp32_out_mm("cpu") is False
    x = torch.ones((2, 2), dtype=torch.bfloat16)
    # torch >= 2.8 has the overload but no CPU kernel for it; older torch has no out_dtype argument at all
    unsupported = NotImplementedError if "dtype" in torch.ops.aten.mm.overloads() else (TypeError, RuntimeError)
    with pytest.raises(unsupported):
        torch.mm(x, x, out_dtype=torch.float32)
    assert chunked._Gemm(x, x, torch.float32).low is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fp32-output GEMM is CUDA-only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_output_gemm_on_cuda(dtype):
    """Torch >= 2.8 has the CUDA kernel and the dispatcher reports it; the 16-bit product then comes back in fp32
    and matches the fp32 product of the same 16-bit values (older torch: reported absent, the upcast path)."""
    has = "dtype" in torch.ops.aten.mm.overloads()
    assert chunked._has_fp32_out_mm("cuda") is has
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 32, device="cuda", generator=g).to(dtype)
    y = torch.randn(32, 48, device="cuda", generator=g).to(dtype)
    gemm = chunked._Gemm(x, y.t(), torch.float32)
    assert gemm.low is has
    got = gemm.mm(gemm.operand(x), gemm.operand(y))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ y.float(), atol=1e-3, rtol=1e-3)


class _LargestOutput(TorchDispatchMode):
    """Records the largest numel of any aten op's output: the logits-sized temporaries are the ops' outputs."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_scratch_is_one_panel(small_panels):
    """Forward and backward at N = 1000: no op returns anything larger than one 64 x N panel (the naive loss
    would allocate N x N, 15.6 x more)."""
    n, d = 1000, 8
    a, b = _features(n, d, seed=2)
    t = torch.tensor(0.1, dtype=torch.float64)
    with _LargestOutput() as mode:
        loss, lse_row, lse_col = chunked.info_nce_fwd_chunked(a, b, t, 0, True)
        da, db = chunked.info_nce_bwd_chunked(torch.tensor(1.0, dtype=torch.float64), a, b, t, lse_row, lse_col,
                                              0, True)
    assert mode.largest == ROWS * n
    ref = _run(info_nce_reference, a, b, t, 1.0)
    assert _rel_err(loss, ref[0]) <= 1e-10
    assert _rel_err(da, ref[1]) <= 1e-10 and _rel_err(db, ref[2]) <= 1e-10


def test_chunked_bad_offset_and_panel_rows():
    a, b = _features(10, 4, seed=1, m=20)
    t = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="offset must be in"):
        chunked.info_nce_fwd_chunked(a, b, t, 11, False)
    with pytest.raises(ValueError, match="symmetric needs N == M"):
        chunked.info_nce_fwd_chunked(a, b, t, 0, True)
    with pytest.raises(ValueError, match="panel_rows must be a positive int"):
        chunked.info_nce_fwd_chunked(a, b, t, 0, False, panel_rows=0)


# --------------------------------------------------------------------------------------------------------------
# the Triton epilogue (EPILOGUE = "triton"), through the interpreter


@pytest.fixture
def triton_epilogue(monkeypatch):
    from lfvila_kernels.backends.triton import triton_available, triton_interpreted

    assert triton_available() is None, triton_available()  # a test dependency: missing is a failure, not a skip
    if not torch.cuda.is_available() and not triton_interpreted():
        pytest.fail("the Triton epilogue tests need TRITON_INTERPRET=1 before triton is imported (conftest.py)")
    monkeypatch.setattr(chunked, "EPILOGUE", "triton")


@pytest.mark.parametrize("r,c", [(1, 1), (64, 1024), (37, 1500), (130, 70)], ids=lambda v: str(v))
def test_epilogue_kernels_match_torch(triton_epilogue, r, c):
    """row_lse / col_lse / probs against torch on fp32 panels, ragged against the kernels' tiles, with logits
    spread over +-40 (scale 20) so the online max matters."""
    from lfvila_kernels.triton import info_nce_epilogue as ep

    g = torch.Generator().manual_seed(r * 7 + c)
    z = torch.rand(r, c, generator=g) * 4 - 2
    scale = torch.tensor([20.0])
    zs = z.double() * 20.0
    torch.testing.assert_close(ep.row_lse(z, scale).double(), torch.logsumexp(zs, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ep.col_lse(z, scale).double(), torch.logsumexp(zs, 0), rtol=1e-6, atol=1e-5)
    lr, lc = torch.logsumexp(zs, 1), torch.logsumexp(zs, 0)
    want = torch.exp(zs - lr[:, None]) + 0.5 * torch.exp(zs - lc[None, :])
    got = ep.probs(z, scale, lr.float(), lc.float(), 0.5, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got = ep.probs(z, scale, lr.float(), None, 0.5, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), torch.exp(zs - lr[:, None]), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("n,d", [(37, 20), (200, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "rows"])
def test_chunked_triton_epilogue_fp32(small_panels, triton_epilogue, n, d, symmetric):
    """The fused forward and the two-pass backward (da from row panels, db from column panels) in fp32 against
    the fp64 reference: loss and the gradients of a, b and temperature, several 64-row/column panels."""
    a, b = _features(n, d, seed=n + d)
    t = torch.tensor(0.07, dtype=torch.float64)
    got = _run(info_nce_loss, a.float(), b.float(), t.float(), 1.7, symmetric=symmetric, backend="chunked")
    ref = _run(info_nce_reference, a, b, t, 1.7, symmetric=symmetric)
    assert _rel_err(got[0], ref[0]) <= 1e-6
    for name, g, r in zip(("da", "db", "dtemperature"), got[1:], ref[1:]):
        assert _rel_err(g, r) <= 2e-5, name


@pytest.mark.parametrize("n,m,offset", [(70, 300, 150), (1, 400, 399), (130, 260, 0)])
def test_chunked_triton_epilogue_offset(small_panels, triton_epilogue, n, m, offset):
    """The rectangular rank-offset form: column panels of b where some columns have no positive row."""
    (loss, _, _, da, db), (ref, rda, rdb), _ = offset_rows_case("chunked", n, m, offset, dtype=torch.float32)
    assert _rel_err(loss, ref) <= 1e-6
    assert _rel_err(da, rda) <= 2e-5 and _rel_err(db, rdb) <= 2e-5


def test_chunked_triton_epilogue_deterministic_and_fp64_untouched(small_panels, triton_epilogue):
    """Bitwise equal on a second call; fp64 inputs keep the torch epilogue (the kernels are fp32): fp64-exact."""
    a, b = _features(150, 40, seed=2)
    t = torch.tensor(0.05)
    first = _run(info_nce_loss, a.float(), b.float(), t, 1.0, backend="chunked")
    again = _run(info_nce_loss, a.float(), b.float(), t, 1.0, backend="chunked")
    assert all(torch.equal(g, h) for g, h in zip(first, again))
    t64 = torch.tensor(0.05, dtype=torch.float64)
    got = _run(info_nce_loss, a, b, t64, 1.0, backend="chunked")
    ref = _run(info_nce_reference, a, b, t64, 1.0)
    assert all(_rel_err(g, r) <= 1e-10 for g, r in zip(got, ref))
