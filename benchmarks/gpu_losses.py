"""GPU part of the one-shot suite for the contrastive losses: `run_loss_suite(device, dry_run)`.

1. Checks: `info_nce_loss(backend=...)` of each fused backend (Triton; the cuBLAS row-panel `chunked` one where
   present, with its torch and its Triton epilogue) against the fp64 reference (loss, da, db, dtemperature), symmetric and not, fp32 / bf16, sizes that
   are not block multiples.
2. Timing: each fused backend vs naive (reference, materialises the N x N logits) forward + backward, bf16,
   D = 1024, N up to 65536, CUDA events; peak extra memory from `torch.cuda.max_memory_allocated`. A naive case
   that runs out of memory is recorded as such, not raised.

With `dry_run=True` everything runs on tiny shapes on the CPU through the Triton interpreter (the caller sets
TRITON_INTERPRET=1 before triton is imported), to exercise the code path without a GPU.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

CHECKS_GPU = [(1000, 1024, "bfloat16", True), (777, 300, "float32", True), (1000, 1024, "bfloat16", False)]
CHECKS_DRY = [(40, 24, "bfloat16", True), (37, 20, "float32", False)]
TIMING_GPU = [4096, 16384, 65536]
TIMING_DRY = [64]
# max |x - ref| / max |ref| allowed per dtype
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _features(n, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _run_backend(backend: str) -> str:
    """The `info_nce_loss` backend for a row name: "chunked_triton" is "chunked" with its Triton epilogue (an
    opt-in module setting, switched here for the call: see lfvila_kernels/backends/chunked.py)."""
    from lfvila_kernels.backends import chunked

    chunked.EPILOGUE = "triton" if backend == "chunked_triton" else "torch"
    return "chunked" if backend == "chunked_triton" else backend


def _loss_and_grads(backend, a, b, t, symmetric):
    from lfvila_kernels import info_nce_loss

    x, y = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_()
    loss = info_nce_loss(x, y, tt, symmetric=symmetric, backend=_run_backend(backend))
    grads = torch.autograd.grad(loss * 1.3, (x, y, tt))
    return (loss.detach(),) + grads


def _fused_backends():
    """The fused backends to check and time: Triton, and the cuBLAS row-panel one where this version has it."""
    from lfvila_kernels.losses import LOSS_BACKENDS

    names = [b for b in ("triton", "chunked") if b in LOSS_BACKENDS]
    return names + (["chunked_triton"] if "chunked" in names else [])


def _check(device, n, d, dtype_name, symmetric, backend="triton"):
    dtype = getattr(torch, dtype_name)
    a, b = _features(n, d, dtype, device, seed=n + d)
    t = torch.tensor(0.05, dtype=torch.float64, device=device)
    got = _loss_and_grads(backend, a, b, t, symmetric)
    ref = _loss_and_grads("reference", a.double(), b.double(), t, symmetric)
    errs = {}
    for name, g, r in zip(("loss", "da", "db", "dtemp"), got, ref):
        errs[name] = ((g.double() - r).abs().max() / r.abs().max().clamp(min=1e-30)).item()
    worst = max(errs.values())
    return {
        "part": "losses", "kind": "check", "backend": backend, "n": n, "d": d, "dtype": dtype_name,
        "symmetric": symmetric,
        **{f"err_{k}": v for k, v in errs.items()}, "ok": bool(worst <= TOL[dtype_name]),
    }


def _time(device, n, d, dtype, backend, reps):
    run_as = _run_backend(backend)
    from lfvila_kernels import info_nce_loss

    a, b = _features(n, d, dtype, device, seed=1)
    a.requires_grad_()
    b.requires_grad_()

    def step():
        loss = info_nce_loss(a, b, 0.05, backend=run_as)
        loss.backward()
        a.grad = None
        b.grad = None

    row = {"part": "losses", "kind": "timing", "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
           "backend": backend if backend != "reference" else "naive", "mode": "fwd+bwd"}
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()  # warm-up (compiles the Triton kernels)
            torch.cuda.synchronize()
            row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        else:
            step()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        row["ms"] = sorted(times)[len(times) // 2]
    except torch.OutOfMemoryError:
        row["ms"] = None
        row["note"] = "out of memory"
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def run_loss_suite(device, dry_run: bool) -> list[dict]:
    """Checks then timings (see the module docstring); returns one dict per row."""
    device = str(torch.device(device).type)
    fused = _fused_backends()
    rows = [_check(device, *c, backend=f) for f in fused for c in (CHECKS_DRY if dry_run else CHECKS_GPU)]
    _run_backend("chunked")  # leave the module setting at its default
    d = 24 if dry_run else 1024
    for n in TIMING_DRY if dry_run else TIMING_GPU:
        reps = 1 if dry_run else (3 if n <= 16384 else 2)
        naive_row = _time(device, n, d, torch.bfloat16, "reference", 1 if n >= 65536 else reps)
        for f in fused:
            fused_row = _time(device, n, d, torch.bfloat16, f, reps)
            if fused_row.get("ms") and naive_row.get("ms"):
                fused_row["speedup_vs_naive"] = naive_row["ms"] / fused_row["ms"]
            if fused_row.get("peak_extra_mb") and naive_row.get("peak_extra_mb"):
                fused_row["mem_ratio_vs_naive"] = fused_row["peak_extra_mb"] / naive_row["peak_extra_mb"]
            rows.append(fused_row)
        rows.append(naive_row)
    _run_backend("chunked")
    return rows


if __name__ == "__main__":  # python benchmarks/gpu_losses.py [--dry-run]
    import os
    import sys

    dry = "--dry-run" in sys.argv
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for r in run_loss_suite("cpu" if dry else "cuda", dry):
        print(r)
