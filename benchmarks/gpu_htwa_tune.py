"""Tile/warp/stage sweep of the HTWA Triton kernels on a GPU, plus a per-kernel time breakdown.

    python benchmarks/gpu_htwa_tune.py [--out DIR] [--budget S] [--dry-run]

Used once per lent GPU to choose the launch settings of lfvila_kernels/triton/htwa_launch.py (`_settings`,
`_launch_kw`, `_target_programs`): every variant is set through the `TUNE` dict of
lfvila_kernels/triton/experimental.py (also home of the opt-in kernels and the diagnostic switch), timed (median
of CUDA events) on representative official shapes (bf16, B=16) and checked against the default variant's output and
gradients, so a fast but wrong setting is never picked. Diagnostic variants (no bias; dQ kernel without its dbias
workspace updates) bound what the bias costs. Appends its figures to `results.csv` under --out after every
variant (benchmarks/results.py, `rows_from_htwa_tune`). `--dry-run` runs the
code path on tiny shapes through the Triton interpreter (correctness only, no meaningful times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = ("layer0", "layer0-shifted", "layer2", "layer3", "layer3-shifted", "layer5")
FWD_VARIANTS = {
    "default": {},
    "w8": {"fwd": {"warps": 8}},
    "b32": {"fwd": {"block": 32}},
    "m128n64w8": {"fwd": {"block_m": 128, "block_n": 64, "warps": 8}},
    "s1": {"fwd": {"stages": 1}},
    "w8s2": {"fwd": {"warps": 8, "stages": 2}},
    "m64n32": {"fwd": {"block_m": 64, "block_n": 32}},
}
# The default backward is 16 x 16 tiles, 2 warps (the winner of the H100 sweep of 2026-11-26, see
# benchmarks/RESULTS.md); these are the leads that sweep left open, most informative first (the sweep stops at
# its time budget).
BWD_VARIANTS = {
    "default": {},
    "small_fused": {"small_fused": True},  # one kernel for layers 0-1 (windows <= 64 tokens); others unchanged
    "small_fused_w2": {"small_fused": True, "small_warps": 2},
    "dbias_kernel": {"dbias_kernel": True},  # dbias workspace from its own kernel: no read-modify-write
    "small_fused+dbias_kernel": {"small_fused": True, "dbias_kernel": True},
    "s1": {"bwd": {"stages": 1}},
    "w4": {"bwd": {"warps": 4}},
    "w1": {"bwd": {"warps": 1}},
    "b32w4": {"bwd": {"block": 32, "warps": 4}},
    "pps64": {"programs_per_sm": 64},
    "diag_no_dbias_rmw": {"no_dbias_rmw": True},
    "diag_no_bias": {"_no_bias": True},
}


def _median_ms(fn, reps):
    """Median CUDA-event time (benchmarks/gpu_cuda.py's timer); on the CPU (dry run) one wall-clock call."""
    import torch

    if not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from benchmarks.gpu_cuda import _time_ms

    return _time_ms(fn, reps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--best-out", default=None, help="also write the best variant's TUNE dict here (JSON)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    import dataclasses

    import torch

    from lfvila_kernels import htwa_attention_qkv
    from lfvila_kernels.shapes import official_cases
    from lfvila_kernels.triton import experimental, htwa_launch

    t_start = time.perf_counter()
    dev = "cpu" if args.dry_run else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if args.dry_run:
        cases = [dataclasses.replace(c, heads=1) for c in official_cases(reduced=True) if c.name in ("layer0-shifted",)]
        batch, dtype, reps = 1, torch.float32, 1
    else:
        cases = [c for c in official_cases() if c.name in CASES]
        batch, dtype, reps = 16, torch.bfloat16, 25
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
              "batch": batch, "dtype": str(dtype), "fwd": [], "bwd": [], "profile": {}}
    path = os.path.join(args.out, "results.csv")
    os.makedirs(args.out, exist_ok=True)
    from benchmarks import results

    ident = {"date": results.utc_now(), "commit": results.git_commit(),
             "machine": results.machine_name(gpu=dev == "cuda") + (" (dry run)" if args.dry_run else "")}
    written = set()

    def save():  # appends the rows not written yet: a sweep stopped at its time limit keeps what it measured
        rows = [r for r in results.rows_from_htwa_tune(report, **ident)
                if (r["benchmark"], r["case"], r["provider"], r["metric"], r["notes"]) not in written]
        written.update((r["benchmark"], r["case"], r["provider"], r["metric"], r["notes"]) for r in rows)
        results.append_rows(rows, path)

    inputs = {}
    for c in cases:
        g = torch.Generator().manual_seed(0)
        T, H, W = c.grid
        qkv = torch.randn(batch, T, H, W, 3, c.heads, c.head_dim, generator=g).to(dev, dtype).requires_grad_()
        bt, bh, bw = c.bias_window
        table = (torch.randn((2 * bt - 1) * (2 * bh - 1) * (2 * bw - 1), c.heads, generator=g) * 0.5).to(dev)
        table.requires_grad_()
        dout = torch.randn(batch, T, H, W, c.heads, c.head_dim, generator=g).to(dev, dtype)
        inputs[c.name] = (qkv, table, dout)

    def call(c, no_bias=False):
        qkv, table, _ = inputs[c.name]
        return htwa_attention_qkv(qkv, None if no_bias else table, window=c.window, shift=c.shift,
                                  bias_window=c.bias_window, backend="triton")

    def fwdbwd(c, no_bias=False):
        qkv, table, dout = inputs[c.name]
        qkv.grad = None
        table.grad = None
        call(c, no_bias).backward(dout)
        return qkv.grad, table.grad

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    # reference results (default settings) for the checks, and the reference backend's times
    base = {}
    for c in cases:
        experimental.TUNE.clear()
        with torch.no_grad():
            out = call(c)
        dq, db = fwdbwd(c)
        base[c.name] = (out.clone(), dq.clone(), db.clone())
    ref_ms = {}
    for c in cases:
        qkv, table, dout = inputs[c.name]

        def ref():
            qkv.grad = None
            table.grad = None
            htwa_attention_qkv(qkv, table, window=c.window, shift=c.shift, bias_window=c.bias_window,
                               backend="reference").backward(dout)

        ref_ms[c.name] = _median_ms(ref, reps)
    report["reference_fwdbwd_ms"] = ref_ms
    save()

    # per-kernel breakdown of the default settings
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name in ("layer0", "layer3", "layer5"):
            c = next(x for x in cases if x.name == name)
            experimental.TUNE.clear()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fwdbwd(c)
                sync()
            rows = sorted(((e.key, e.device_time_total / 3 / 1e3) for e in prof.key_averages()
                           if e.device_time_total > 0), key=lambda r: -r[1])
            report["profile"][name] = [{"kernel": k[:90], "ms_per_call": round(ms, 4)} for k, ms in rows[:12]]
            print(f"profile {name}:", *(f"  {r['ms_per_call']:8.4f} ms  {r['kernel']}"
                                         for r in report["profile"][name]), sep="\n", flush=True)
        save()

    def sweep(kind, variants):
        for vname, tune in variants.items():
            if time.perf_counter() - t_start > args.budget:
                report[kind].append({"variant": vname, "skipped": "time budget"})
                continue
            experimental.TUNE.clear()
            experimental.TUNE.update({k: v for k, v in tune.items() if not k.startswith("_")})
            htwa_launch._chunk_plan.cache_clear()
            htwa_launch._unit_plan.cache_clear()
            no_bias = tune.get("_no_bias", False)
            row = {"variant": vname, "tune": tune}
            t0 = time.perf_counter()
            try:
                for c in cases:
                    if kind == "fwd":
                        def fn():
                            with torch.no_grad():
                                call(c)
                        row[c.name] = round(_median_ms(fn, reps), 4)
                        with torch.no_grad():
                            err = rel(call(c), base[c.name][0])
                    else:
                        row[c.name] = round(_median_ms(lambda: fwdbwd(c, no_bias), reps), 4)
                        dq, db = fwdbwd(c, no_bias)
                        err = rel(dq, base[c.name][1])
                        if not (no_bias or tune.get("no_dbias_rmw")):
                            err = max(err, rel(db, base[c.name][2]))
                    row[c.name + "_err"] = err
                # diagnostic variants compute something else on purpose: no verdict
                diag = vname.startswith("diag")
                row["ok"] = None if diag else all(row[c.name + "_err"] < 2e-2 for c in cases)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            report[kind].append(row)
            print(kind, json.dumps(row), flush=True)
            save()
        experimental.TUNE.clear()
        htwa_launch._chunk_plan.cache_clear()
        htwa_launch._unit_plan.cache_clear()

    # the forward first: the H100 sweep of 2026-11-26 ran out of time before it; the backward is still most of
    # the time (layer3: 2.1 of 2.9 ms after that sweep)
    sweep("fwd", FWD_VARIANTS)
    sweep("bwd", BWD_VARIANTS)

    def best(kind):
        """The checked variant with the least summed time over the cases (the default when none beats it)."""
        done = [r for r in report[kind] if r.get("ok") and all(c.name in r for c in cases)]
        if not done:
            return "default", {}
        r = min(done, key=lambda r: sum(r[c.name] for c in cases))
        return r["variant"], r["tune"]

    (bn, bt), (fn_, ft) = best("bwd"), best("fwd")
    report["best"] = {"bwd": bn, "fwd": fn_, "tune": {**bt, **ft}}
    save()
    if args.best_out:
        with open(args.best_out, "w") as f:
            json.dump(report["best"]["tune"], f)
    print("best:", json.dumps(report["best"]), flush=True)
    print("reference fwd+bwd ms:", json.dumps(ref_ms))
    print(f"wrote {path} after {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
