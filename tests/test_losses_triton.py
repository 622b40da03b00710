"""The Triton InfoNCE kernels against the fp64 reference, on the CPU through the Triton interpreter (on a GPU
machine the same tests run the compiled kernels on CUDA tensors as well)."""

from __future__ import annotations

import os

# The interpreter must be chosen before triton is imported (CPU tensors need it).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lfvila_kernels import info_nce_loss  # noqa: E402
from lfvila_kernels.backends.triton import triton_interpreted  # noqa: E402
from lfvila_kernels.reference import info_nce_reference  # noqa: E402
from tests.helpers import loss_and_grads, unit_features  # noqa: E402

if not torch.cuda.is_available() and not triton_interpreted():
    pytest.fail(
        "TRITON_INTERPRET is not 1 on a machine without a GPU: the Triton loss tests need the interpreter, "
        "chosen before triton is imported (the root conftest.py does this unless TRITON_INTERPRET is set)",
        pytrace=False,
    )

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# loss and gradient tolerances (relative to the gradient's max) per dtype
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


_features = unit_features
_run = loss_and_grads


# float64 runs only through the interpreter: the Triton backend refuses it on the GPU (can_run_triton)
_DEVICE_DTYPES = [(dev, dt) for dev in DEVICES
                  for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                  if not (dev == "cuda" and dt == torch.float64)]


@pytest.mark.parametrize("device,dtype", _DEVICE_DTYPES, ids=[f"{d}-{t}" for d, t in _DEVICE_DTYPES])
@pytest.mark.parametrize("n,d,symmetric", [(37, 20, True), (50, 33, False)], ids=["N37-D20-sym", "N50-D33-rows"])
def test_info_nce_triton_matches_reference(device, dtype, n, d, symmetric):
    a, b = _features(n, d, seed=n + d)
    a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    t = torch.tensor(0.07, dtype=torch.float64)
    got = _run(info_nce_loss, a, b, t, 1.9, symmetric=symmetric, backend="triton")
    # the reference sees the same (rounded) inputs, in fp64
    ref = _run(info_nce_reference, a.double().cpu(), b.double().cpu(), t, 1.9, symmetric=symmetric)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[3].dtype == torch.float64
    tol = TOL[dtype]
    for name, g, r in zip(("loss", "da", "db", "dtemperature"), got, ref):
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double().cpu(), r, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_info_nce_triton_offset_rows_and_extreme_logits(dtype):
    """Rectangular rows-only form (distributed building block) with extreme logits (features x100, t = 0.01, so
    |z| ~ 1e6). No inf/nan in any dtype; fp64 matches the reference tightly. In fp32 only the loss is compared:
    with |z| ~ 1e6 an fp32 logit is uncertain by ~0.1, which moves the softmax of near-tied rows by O(1), so
    the gradients of such rows are ill-conditioned in any fp32 implementation."""
    a, b = _features(20, 24, seed=3, m=50)
    a, b = a * 100, b * 100
    b[27] = a[7]  # row 7's positive (offset 20) is its own copy: the largest logit of the row
    t = torch.tensor(0.01, dtype=torch.float64)
    x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    loss, lse_row, lse_col = torch.ops.lfvila.info_nce_fwd(x, y, t, 20, False, "triton")
    da, db = torch.autograd.grad(loss, (x, y))
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = info_nce_reference(x2, y2, t, symmetric=False, offset=20)
    rda, rdb = torch.autograd.grad(ref, (x2, y2))
    assert torch.isfinite(loss) and torch.isfinite(da).all() and torch.isfinite(db).all()
    assert ref.item() > 1e4
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(lse_row.double(), torch.logsumexp(a @ b.T / 0.01, 1), rtol=tol, atol=0)
    if dtype == torch.float64:
        for g, r in ((da, rda), (db, rdb)):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9 * r.abs().max().item())


def test_info_nce_triton_agrees_with_cpp():
    a, b = _features(45, 18, seed=8)
    a, b = a.float(), b.float()
    t = torch.tensor(0.05, dtype=torch.float64)
    got = _run(info_nce_loss, a, b, t, 1.0, backend="triton")
    cpp = _run(info_nce_loss, a, b, t, 1.0, backend="cpp")
    for g, c in zip(got, cpp):
        torch.testing.assert_close(g, c, atol=2e-5, rtol=2e-5)


def test_opcheck_triton_ops():
    a, b = _features(20, 16, seed=1)
    a, b = a.float(), b.float()
    t = torch.tensor(0.2)
    torch.library.opcheck(
        torch.ops.lfvila.info_nce_fwd.default,
        (a.clone().requires_grad_(), b.clone().requires_grad_(), t, 0, True, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_gpu_loss_suite_dry_run():
    """The GPU suite's loss part (benchmarks/gpu_losses.py) runs end to end on tiny shapes and its checks pass."""
    from benchmarks.gpu_losses import run_loss_suite

    rows = run_loss_suite("cuda" if torch.cuda.is_available() else "cpu", dry_run=True)
    checks = [r for r in rows if r["kind"] == "check"]
    timings = [r for r in rows if r["kind"] == "timing"]
    assert checks and all(r["ok"] for r in checks), checks
    from benchmarks.gpu_losses import _fused_backends

    assert {r["backend"] for r in timings} == {*_fused_backends(), "naive"} and all(r["ms"] > 0 for r in timings)


def test_triton_kernels_compile_for_sm90():
    """The GPU code path (bf16 tensor-core dots, IEEE fp32 dots), which the interpreter never runs, compiles for
    sm_90 (H100) with Triton's bundled compiler; no GPU needed. Runs in a subprocess without the interpreter."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="this triton has no CUDA backend (no GPU toolchain)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "tests.info_nce_aot"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 10, proc.stdout  # 6 loss kernel variants + 4 chunked epilogues
