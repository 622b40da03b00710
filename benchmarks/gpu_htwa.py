"""HTWA part of the one-shot GPU suite (benchmarks/gpu_suite.py): `run_htwa_suite(device, dry_run)`.

On CUDA, for the 12 official (layer, shifted) cases at B=16:
1. checks: every backend's bf16 output and gradients (q, k, v, bias table) against the reference computed in fp32
   from the same bf16 inputs; `max_err` = max over those tensors of max|x - ref| / max|ref|. The reference
   backend's own bf16 row is the rounding baseline to read the others against. The Triton dbias is also run
   twice and compared bit for bit (`dbias_deterministic`). "triton-legacy" is the Triton backend with the
   previous per-window kernels (experimental.TUNE["legacy_kernels"]), checked and timed beside the default.
   fp32 (Triton vs reference) on two cases if time is left.
2. timings: forward and forward+backward, median of CUDA-event timed runs after warm-up, for reference, SDPA
   with a dense bias+mask on partitioned windows, FlexAttention with the bias as score_mod, and triton; plus the
   peak memory of one forward+backward.
GPU time is scarce: a time budget (`budget_s`) is checked before every measurement and whatever does not fit
is reported as skipped, cheapest and most important first (FlexAttention compiles per shape, so it goes last).
Every failure is caught and reported in its row, so one broken backend never loses the rest of the run.

With dry_run=True: tiny shapes on the CPU, Triton through the interpreter, correctness only (no timings).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

_GPU_BATCH = 16
FLEX_CASES = ("layer0", "layer3", "layer5")


def _inputs(case, batch, dtype, device, seed=0):
    """q, k, v as views of one qkv projection (the model's layout), a bias table, an upstream gradient."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T, H, W = case.grid
    qkv = torch.randn(batch, T, H, W, 3, case.heads, case.head_dim, generator=g).to(device=device, dtype=dtype)
    bt, bh, bw = case.bias_window
    table = (torch.randn((2 * bt - 1) * (2 * bh - 1) * (2 * bw - 1), case.heads, generator=g) * 0.5).to(device)
    dout = torch.randn(batch, T, H, W, case.heads, case.head_dim, generator=g).to(device=device, dtype=dtype)
    return qkv, table, dout


LEGACY = "triton-legacy"  # backend "triton" with the per-window kernels (experimental.TUNE["legacy_kernels"])


@contextlib.contextmanager
def _variant(backend):
    """The op's backend for a row: LEGACY is "triton" with the previous kernels, for forward and backward."""
    if backend != LEGACY:
        yield backend
        return
    from lfvila_kernels.triton import experimental

    experimental.TUNE["legacy_kernels"] = True
    try:
        yield "triton"
    finally:
        experimental.TUNE.pop("legacy_kernels", None)


def _run(case, backend, qkv, table, dout, grads: bool):
    """One forward (and backward) through `htwa_attention_qkv`; returns (out, [dq, dk, dv], dbias)."""
    from lfvila_kernels import htwa_attention_qkv

    qkv = qkv.detach().requires_grad_(grads)
    tab = table.detach().requires_grad_(grads)
    with _variant(backend) as backend:
        # the packed entry point, as the model and the CPU benchmarks call it (the torch backends unbind it)
        out = htwa_attention_qkv(qkv, tab, window=case.window, shift=case.shift, bias_window=case.bias_window,
                                 backend=backend)
        if not grads:
            return out, None, None
        out.backward(dout)
    return out.detach(), list(qkv.grad.unbind(4)), tab.grad


def _rel(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _errors(got, ref):
    out, grads, db = got
    r_out, r_grads, r_db = ref
    errs = {"out": _rel(out, r_out)}
    errs.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, r_grads)})
    errs["dbias"] = _rel(db, r_db)
    return errs


def _median_ms(fn, sync, budget_left):
    """Median of CUDA-event timed calls: 2 warm-up calls (compilation included), then as many runs as fit in
    ~0.3 s (5 to 50)."""
    import torch

    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    n = int(min(50, max(5, 0.3 / max(one, 1e-6))))
    if one * n > budget_left():
        n = max(1, int(budget_left() / max(one, 1e-6)) - 1)
        if n < 1:
            raise TimeoutError("time budget spent")
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    sync()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def run_htwa_suite(device, dry_run: bool, budget_s: float = 170.0, cases=None) -> list[dict]:
    """Rows of (case, backend, dtype, fwd_ms, fwdbwd_ms, max_err, ...) for the HTWA backends.

    device: "cuda" or "cpu" (dry run). budget_s: wall-clock budget of the whole HTWA part (compilation
    included); rows that do not fit say so in `skipped`. cases: optional list of case names to run.
    """
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from lfvila_kernels.backends.triton import triton_interpreted
    from lfvila_kernels.shapes import official_cases

    device = torch.device(device)
    if device.type == "cpu" and not triton_interpreted():
        raise RuntimeError("the CPU dry run needs TRITON_INTERPRET=1 set before triton is imported")
    t_start = time.perf_counter()

    def left():
        return budget_s - (time.perf_counter() - t_start)

    if device.type == "cuda":
        sel, batch = official_cases(), _GPU_BATCH
        sync = torch.cuda.synchronize
        try:  # FlexAttention compiles once per shape: allow all 12 (past the limit, 8, it would run eagerly)
            import torch._dynamo

            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        except Exception:  # noqa: BLE001 - only a tuning knob
            pass
    else:
        import dataclasses

        # tiny: one head, the reduced grids, a shifted and ragged case plus the largest window
        sel = [dataclasses.replace(c, heads=1) for c in official_cases(reduced=True)
               if c.name in ("layer0-shifted", "layer5")]
        batch, sync = 1, (lambda: None)
    if cases is not None:
        sel = [c for c in sel if c.name in cases]

    rows: dict = {}

    def row(case, backend, dtype):
        key = (case.name, backend, str(dtype).replace("torch.", ""))
        if key not in rows:
            rows[key] = dict(case=key[0], backend=backend, dtype=key[2], fwd_ms=None, fwdbwd_ms=None, max_err=None)
        return rows[key]

    from lfvila_kernels import htwa_attention_qkv

    def check(case, backends, dtype):
        """Errors of `backends` against the fp32 reference of the same inputs (fp64 for fp32 inputs)."""
        qkv, table, dout = _inputs(case, batch if dtype != torch.float32 or device.type == "cpu" else 4, dtype,
                                   device)
        up = torch.float64 if (dtype == torch.float32 and device.type == "cuda") else torch.float32
        try:
            ref = _run(case, "reference", qkv.to(up), table.to(up), dout.to(up), True)
        except Exception as exc:  # noqa: BLE001
            row(case, "reference", dtype)["error"] = f"reference in {up}: {type(exc).__name__}: {exc}"
            return
        for backend in backends:
            r = row(case, backend, dtype)
            if left() < 20 and not backend.startswith("triton"):
                r["skipped"] = "time budget"
                continue
            try:
                got = _run(case, backend, qkv, table, dout, True)
                errs = _errors(got, ref)
                r["max_err"] = max(errs.values())
                r["worst"] = max(errs, key=errs.get)
                if backend.startswith("triton"):
                    again = _run(case, backend, qkv, table, dout, True)[2]
                    r["dbias_deterministic"] = bool(torch.equal(got[2], again))
                del got
            except Exception as exc:  # noqa: BLE001
                r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        del ref, qkv, dout
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def timing(case, backend, dtype):
        r = row(case, backend, dtype)
        if "error" in r or "skipped" in r:
            return
        if left() < 15:
            r["skipped"] = "time budget"
            return
        qkv, table, dout = _inputs(case, batch, dtype, device)
        leaf = qkv.detach().requires_grad_()
        tab = table.detach().requires_grad_()
        kw = dict(window=case.window, shift=case.shift, bias_window=case.bias_window)

        def fwd():
            with torch.no_grad(), _variant(backend) as name:
                htwa_attention_qkv(leaf, tab, backend=name, **kw)

        def fwdbwd():
            leaf.grad = None
            tab.grad = None
            with _variant(backend) as name:
                htwa_attention_qkv(leaf, tab, backend=name, **kw).backward(dout)

        try:
            r["fwd_ms"] = _median_ms(fwd, sync, left)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            r["fwdbwd_ms"] = _median_ms(fwdbwd, sync, left)
            r["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"timing: {type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.empty_cache()

    if device.type != "cuda":
        for case in sel:
            check(case, ("triton",), torch.float32)
        return _finish(rows)

    bf16 = torch.bfloat16
    # 1. bf16 checks of ours and the cheap baselines, all cases (the Triton kernels compile here: one set for
    #    the 30-token windows of layer 0 and one for the rest, whose windows differ only in time)
    for case in sel:
        check(case, ("reference", "sdpa", "triton", LEGACY), bf16)
    # 2. their bf16 timings (the previous Triton kernels beside the new ones: the A/B of issue 18)
    for backend in ("triton", LEGACY, "reference", "sdpa"):
        for case in sel:
            timing(case, backend, bf16)
    # 3. fp32 checks of the Triton backend (exact fp32 products) against an fp64 reference, B=4
    for name in ("layer0-shifted", "layer5"):
        case = next((c for c in sel if c.name == name), None)
        if case is not None and left() > 20:
            check(case, ("triton",), torch.float32)
    # 4. FlexAttention last: it compiles per shape (tens of seconds each), so it gets what time is left, on the
    #    smallest, a middle and the largest window (an H100 run of 2026-11-26 fitted one shape of all twelve)
    for case in sel:
        if case.name not in FLEX_CASES:
            continue
        if left() < 40:
            row(case, "flex", bf16)["skipped"] = "time budget"
            continue
        check(case, ("flex",), bf16)
        timing(case, "flex", bf16)
    return _finish(rows)


def _finish(rows):
    out = list(rows.values())
    for r in out:
        for key in ("fwd_ms", "fwdbwd_ms", "max_err"):
            if isinstance(r.get(key), float) and not math.isfinite(r[key]):
                r[key] = str(r[key])
    return out


if __name__ == "__main__":  # python benchmarks/gpu_htwa.py [--dry-run]
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dry = "--dry-run" in sys.argv
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for r in run_htwa_suite("cpu" if dry else "cuda", dry):
        print(json.dumps(r))
