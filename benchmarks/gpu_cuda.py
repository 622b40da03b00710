"""GPU part of the suite for the hand-written CUDA kernels (csrc/htwa_cuda.cu, csrc/info_nce_cuda.cu).

`run_cuda_suite(device, dry_run) -> list[dict]` (wired into benchmarks/gpu_suite.py by its owner):
- HTWA, backend="cuda" vs backend="reference", every official (layer, shifted) case, fp32 / fp16 / bf16, batch 2:
  max error of the output and of every gradient (q, k, v through the shared qkv tensor, and the bias table)
  relative to the largest reference value, and whether dbias is bitwise identical on a second backward.
- HTWA timing, bf16, official shapes, batch 16: forward and forward+backward medians (CUDA events), cuda vs
  reference.
- InfoNCE through the compiled ops lfvila_C::info_nce_fwd / info_nce_bwd (CUDA kernels) vs the naive loss
  (materialised logits): loss, lse and gradient errors; time and peak extra memory at D = 1024, bf16.
With dry_run, or without a GPU, it returns a single note row: the CUDA kernels need a GPU.
"""

from __future__ import annotations

import statistics

NOTE_NO_GPU = "CUDA kernels need a GPU (the CPU-side check is `make cuda-check` and tests/test_cuda_emu.py)"
HTWA_CHECK_BATCH = 2
HTWA_TIME_BATCH = 16
LOSS_SIZES = (4096, 16384)
LOSS_DIM = 1024
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _time_ms(fn, reps: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rel_err(got, want) -> float:
    got, want = got.float(), want.float()
    scale = want.abs().max().clamp_min(1e-6)
    return ((got - want).abs().max() / scale).item()


def _htwa_run(case, batch, dtype, backend, seed=0, need_grad=True):
    """out, grads (q, k, v, bias) of htwa_attention on a case's inputs."""
    import torch

    from lfvila_kernels import htwa_attention
    from lfvila_kernels.shapes import make_htwa_inputs

    qkv, (q, k, v), bias = make_htwa_inputs(case, batch=batch, dtype=dtype, device="cuda",
                                            requires_grad=need_grad, seed=seed)
    out = htwa_attention(q, k, v, bias, window=case.window, shift=case.shift, bias_window=case.bias_window,
                         backend=backend)
    if not need_grad:
        return out, None
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
    out.backward(dout)
    return out.detach(), (*qkv.grad.unbind(4), bias.grad)


def _htwa_checks(rows):
    import torch

    from lfvila_kernels.shapes import official_cases

    for case in official_cases():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            row = {"part": "cuda", "op": "htwa", "check": case.name, "dtype": name}
            try:
                out, grads = _htwa_run(case, HTWA_CHECK_BATCH, dtype, "cuda")
                # the fp32 reference on the unrounded inputs (the tolerances cover the fp16/bf16 rounding)
                ref_out, ref_grads = _htwa_run(case, HTWA_CHECK_BATCH, torch.float32, "reference")
                errs = [_rel_err(out, ref_out)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
                for key, e in zip(("err_out", "err_dq", "err_dk", "err_dv", "err_dbias"), errs):
                    row[key] = e
                _, grads2 = _htwa_run(case, HTWA_CHECK_BATCH, dtype, "cuda")
                row["dbias_deterministic"] = bool(torch.equal(grads[3], grads2[3]))
                row["ok"] = max(errs) <= TOL[name] and row["dbias_deterministic"]
            except Exception as exc:  # record and go on: GPU time is scarce
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)


def _htwa_timing(rows):
    import torch

    from lfvila_kernels import htwa_attention
    from lfvila_kernels.shapes import make_htwa_inputs, official_cases

    for case in official_cases():
        row = {"part": "cuda", "op": "htwa", "time": case.name, "dtype": "bfloat16", "batch": HTWA_TIME_BATCH}
        try:
            qkv, (q, k, v), bias = make_htwa_inputs(case, batch=HTWA_TIME_BATCH, dtype=torch.bfloat16,
                                                    device="cuda", requires_grad=True)
            dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
            kw = dict(window=case.window, shift=case.shift, bias_window=case.bias_window)
            for backend in ("cuda", "reference"):
                def fwd():
                    with torch.no_grad():
                        htwa_attention(q, k, v, bias, backend=backend, **kw)

                def fwd_bwd():
                    qkv.grad = bias.grad = None
                    htwa_attention(q, k, v, bias, backend=backend, **kw).backward(dout)

                row[f"{backend}_fwd_ms"] = _time_ms(fwd, 10)
                row[f"{backend}_fwdbwd_ms"] = _time_ms(fwd_bwd, 10)
            row["speedup_fwdbwd"] = row["reference_fwdbwd_ms"] / row["cuda_fwdbwd_ms"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)


def _naive_info_nce(a, b, scale):
    import torch

    z = (a @ b.T).float() * scale
    idx = torch.arange(a.shape[0], device=a.device)
    pos = z[idx, idx]
    return (torch.logsumexp(z, 1) - pos).mean() + (torch.logsumexp(z, 0) - pos).mean()


def _fused_info_nce(a, b, scale):
    import torch

    loss, lse_row, lse_col = torch.ops.lfvila_C.info_nce_fwd(a, b, scale, 0, True)
    return loss, lse_row, lse_col


def _loss_checks_and_timing(rows):
    import torch

    scale = 1 / 0.05
    for n in (300,) + LOSS_SIZES:
        for dtype in ((torch.float32, torch.bfloat16) if n == 300 else (torch.bfloat16,)):
            name = str(dtype).replace("torch.", "")
            row = {"part": "cuda", "op": "info_nce", "n": n, "d": LOSS_DIM, "dtype": name}
            try:
                gen = torch.Generator(device="cuda").manual_seed(n)
                a = torch.nn.functional.normalize(torch.randn(n, LOSS_DIM, device="cuda", generator=gen), dim=1)
                b = torch.nn.functional.normalize(torch.randn(n, LOSS_DIM, device="cuda", generator=gen), dim=1)
                a, b = a.to(dtype), b.to(dtype)
                loss, lse_row, lse_col = _fused_info_nce(a, b, scale)
                a_ref = a.float().requires_grad_(True)
                b_ref = b.float().requires_grad_(True)
                ref = _naive_info_nce(a_ref, b_ref, scale)
                ref.backward()
                da, db = torch.ops.lfvila_C.info_nce_bwd(torch.ones((), device="cuda"), a, b, lse_row, lse_col,
                                                        scale, 0, True)
                row["err_loss"] = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-6)
                row["err_da"] = _rel_err(da, a_ref.grad)
                row["err_db"] = _rel_err(db, b_ref.grad)
                da2, db2 = torch.ops.lfvila_C.info_nce_bwd(torch.ones((), device="cuda"), a, b, lse_row, lse_col,
                                                          scale, 0, True)
                row["deterministic"] = bool(torch.equal(da, da2) and torch.equal(db, db2))
                row["ok"] = max(row["err_loss"], row["err_da"], row["err_db"]) <= TOL[name] and row["deterministic"]
                del a_ref, b_ref, ref
                if n == 300:
                    rows.append(row)
                    continue
                a_g, b_g = a.detach().requires_grad_(True), b.detach().requires_grad_(True)

                def naive():
                    a_g.grad = b_g.grad = None
                    _naive_info_nce(a_g, b_g, scale).backward()

                def fused():
                    _, lr, lc = torch.ops.lfvila_C.info_nce_fwd(a, b, scale, 0, True)
                    torch.ops.lfvila_C.info_nce_bwd(torch.ones((), device="cuda"), a, b, lr, lc, scale, 0, True)

                for label, fn, reps in (("naive", naive, 5), ("cuda", fused, 3)):
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    row[f"{label}_fwdbwd_ms"] = _time_ms(fn, reps, warmup=1)
                    row[f"{label}_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["time_ratio"] = row["cuda_fwdbwd_ms"] / row["naive_fwdbwd_ms"]
                row["mem_ratio"] = row["cuda_peak_extra_mb"] / max(row["naive_peak_extra_mb"], 1e-6)
            except Exception as exc:
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)


def run_cuda_suite(device, dry_run: bool) -> list[dict]:
    import torch

    if dry_run or str(device) != "cuda" or not torch.cuda.is_available():
        return [{"part": "cuda", "note": NOTE_NO_GPU}]
    from lfvila_kernels.backends import cpp as _ext

    missing = [op for op in ("htwa_fwd", "htwa_bwd", "info_nce_fwd", "info_nce_bwd")
               if _ext.load_error() is not None or not _ext.has_kernel(op, "cuda")]
    if missing:
        why = _ext.load_error() or f"lfvila_kernels._C has no CUDA kernel for {', '.join(missing)}"
        return [{"part": "cuda", "note": f"CUDA kernels not built: {why}"}]
    rows: list[dict] = []
    if _ext.can_run_compiled("htwa_fwd", "cuda", torch.device("cuda")):
        _htwa_checks(rows)
        _htwa_timing(rows)
    _loss_checks_and_timing(rows)
    return rows
