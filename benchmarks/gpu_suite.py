"""The one-shot GPU conformance and performance run.

    python benchmarks/gpu_suite.py [--out DIR] [--dry-run] [--only htwa,losses,model]

On a CUDA machine (H100/H200): checks every GPU backend against the reference on the official shapes and times
it against the baselines (see benchmarks/gpu_htwa.py and benchmarks/gpu_losses.py), prints one table and appends
every figure as rows of `results.csv` under --out (default: $OUT or the current directory; columns in
benchmarks/results.py), part by part. Back on the development machine, `python benchmarks/results.py add
OUT/results.csv` appends them to benchmarks/results.csv. GPU time is scarce: the whole run is sized
to finish in a few minutes. With --dry-run it runs the same code on tiny shapes on the CPU through the Triton
interpreter, so the script itself is tested without a GPU.

Build first on the GPU machine: `pip install --no-build-isolation --no-deps .` (no network there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for results.csv")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU via the Triton interpreter")
    p.add_argument("--only", default="htwa,losses,cuda,model", help="comma-separated parts to run")
    p.add_argument("--csv", default="results.csv", help="file name of the results CSV under --out (appended to)")
    p.add_argument("--htwa-budget", type=float, default=170.0,
                   help="seconds the HTWA part may spend (FlexAttention, compiled per shape, gets what is left)")
    return p.parse_args(argv)


def _print_table(rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (list, dict))]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
    for r in rows:  # nested results (e.g. a profile's top kernels) below the table, one line each
        for k, v in r.items():
            if isinstance(v, list) and v:
                print(f"{k} of {r.get('backend', r.get('case', ''))}:")
                for item in v:
                    print("   ", json.dumps(item))


def main(argv=None):
    args = _parse(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
    sys.path.insert(0, ROOT)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; use --dry-run to exercise the suite on the CPU")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "parts": {},
    }
    tune_path = os.environ.get("LFVILA_HTWA_TUNE")
    if tune_path:  # launch settings chosen by benchmarks/gpu_htwa_tune.py in the same session
        from lfvila_kernels.triton import experimental as htwa_experimental

        with open(tune_path) as f:
            htwa_experimental.TUNE.update(json.load(f))
        report["htwa_tune"] = dict(htwa_experimental.TUNE)
        print(f"gpu_suite: HTWA Triton launch settings {htwa_experimental.TUNE}", flush=True)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    runners = {
        "htwa": ("benchmarks.gpu_htwa", "run_htwa_suite"),
        "losses": ("benchmarks.gpu_losses", "run_loss_suite"),
        "cuda": ("benchmarks.gpu_cuda", "run_cuda_suite"),
        "model": ("benchmarks.gpu_model", "run_model_suite"),
    }
    failures = 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.csv)
    from benchmarks import results

    ident = {"date": results.utc_now(), "commit": results.git_commit(),
             "machine": results.machine_name(gpu=device == "cuda")}
    ident["machine"] += " (dry run)" if args.dry_run else ""
    notes = f"htwa_tune={json.dumps(report['htwa_tune'], separators=(',', ':'))}" if "htwa_tune" in report else ""
    print(f"gpu_suite: {report['device']}, torch {report['torch']}, triton {triton_version}, parts {parts}",
          flush=True)
    for part in parts:
        module, fn = runners[part]
        t0 = time.time()
        try:
            mod = __import__(module, fromlist=[fn])
            kwargs = {"budget_s": args.htwa_budget} if part == "htwa" else {}
            rows = getattr(mod, fn)(device, args.dry_run, **kwargs)
            status = "ok"
        except ModuleNotFoundError as exc:
            rows, status = [], f"missing: {exc}"
        except Exception as exc:  # keep the other parts' results: GPU time is too scarce to lose them
            rows, status = [], f"error: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            failures += 1
        report["parts"][part] = {"status": status, "seconds": round(time.time() - t0, 1), "rows": rows}
        print(f"\n== {part}: {status} ({time.time() - t0:.1f} s)")
        _print_table(rows)
        # written after every part: a run stopped at its time limit still leaves what it measured
        results.append_rows(results.rows_from_gpu_part(part, rows, notes=notes, **ident), path)
        sys.stdout.flush()
    print(f"\nwrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
