"""The results table: every measured figure of every benchmark run is one row of `benchmarks/results.csv`.

Columns (`COLUMNS`): `date` (UTC, ISO 8601 to the second, `Z`), `machine` (CPU model and core count, or the GPU's
name), `commit` (short hash of the code measured, `-dirty` when the tree had changes, `unknown` outside git),
`benchmark` (the suite's test or part: `htwa`, `htwa_paired`, `info_nce`, `stage1_fwd_bwd`, `gpu_htwa`, ...),
`case` (the shape or workload: the pytest-benchmark group, or the GPU row's identifying fields), `provider` (the
implementation: `reference`, `sdpa`, `flex`, `cpp`, `auto`, `fused`, `triton`, `chunked`, `cuda`, `naive`, ...),
`metric`, `value`, `unit`, `notes`.

Rows are only ever appended (`append_rows`), with the `csv` module; `read_rows` reads them back (benchmarks/report.py).
Who writes rows:
- `pytest benchmarks/`: the hook in benchmarks/conftest.py (`rows_from_pytest_benchmark`), to `default_path()`:
  `$LFVILA_RESULTS_CSV` when set (`0` or empty: write nothing), else this directory's results.csv;
- the GPU suite (`gpu_suite.py`, `gpu_htwa_tune.py`) to `$OUT/results.csv` (`rows_from_gpu_part`,
  `rows_from_htwa_tune`); append that file to the repository's with `python benchmarks/results.py add FILE`;
- `benchmarks/import_json.py`: pytest-benchmark JSON files (and the GPU suite's older JSON reports).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import sys

COLUMNS = ["date", "machine", "commit", "benchmark", "case", "provider", "metric", "value", "unit", "notes"]
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results.csv")
ENV = "LFVILA_RESULTS_CSV"

# extra_info keys of the pytest suites that are measurements (the others describe the case): key -> (metric, unit,
# scale applied to the stored value)
_MEASURED = {
    "peak_extra_bytes": ("peak_extra", "MiB", 1 / 2**20),
    "items_per_s": ("items_per_s", "1/s", 1.0),
    "seconds_per_step": ("step", "s", 1.0),
    "data_fraction": ("data_wait_fraction", "", 1.0),
}
# which provider is "ours" in a paired group whose extra_info does not name it (files written before it did)
_PAIRED_OURS = {"htwa": "cpp", "model": "auto"}


# ---------------------------------------------------------------------------------------------------- writing
def default_path() -> str | None:
    """Where the benchmark hook writes: `$LFVILA_RESULTS_CSV` if set (None when it is `0` or empty), else
    benchmarks/results.csv."""
    path = os.environ.get(ENV)
    if path is None:
        return DEFAULT_CSV
    return None if path in ("", "0") else path


def append_rows(rows, path: str | None = None) -> int:
    """Appends `rows` (dicts with the keys of COLUMNS; missing keys are written empty, unknown keys refused) to the
    CSV at `path` (default: `default_path()`), writing the header first when the file is new or empty. Returns the
    number of rows written (0 when writing is disabled)."""
    path = default_path() if path is None else path
    rows = list(rows)
    if path is None or not rows:
        return 0
    for r in rows:
        unknown = set(r) - set(COLUMNS)
        if unknown:
            raise ValueError(f"append_rows: unknown column(s) {sorted(unknown)}; expected a subset of {COLUMNS}")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in COLUMNS})
    return len(rows)


def read_rows(path: str | None = None) -> list[dict]:
    """The rows of the CSV at `path` (default benchmarks/results.csv) as dicts of strings, `value` as a float."""
    path = path or DEFAULT_CSV
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or list(reader.fieldnames)[: len(COLUMNS)] != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not {COLUMNS}")
        rows = []
        for r in reader:
            r["value"] = float(r["value"])
            rows.append(r)
    return rows


def _cell(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ------------------------------------------------------------------------------------------- run identity
def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_utc(stamp: str) -> str:
    """An ISO 8601 time stamp (with an offset, or naive = UTC) as `YYYY-MM-DDTHH:MM:SSZ`."""
    t = _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def machine_name(machine_info: dict | None = None, gpu: bool = False) -> str:
    """`"<CPU model> (<n> cores)"`, from pytest-benchmark's `machine_info` when given, else from /proc/cpuinfo;
    with `gpu=True` the name of CUDA device 0 (torch.cuda.get_device_name)."""
    if gpu:
        import torch

        return torch.cuda.get_device_name()
    cpu = (machine_info or {}).get("cpu", {})
    model, cores = cpu.get("brand_raw"), cpu.get("count")
    if not model:
        model = platform.processor() or platform.machine() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{model} ({cores or os.cpu_count()} cores)"


def git_commit(root: str | None = None) -> str:
    """Short hash of HEAD in `root` (default: the repository holding this file), `-dirty` appended when tracked
    files differ from it; "unknown" outside git."""
    root = root or os.path.dirname(HERE)
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=20)
        head = run("rev-parse", "--short=7", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def commit_from_info(commit_info: dict | None) -> str:
    """pytest-benchmark's `commit_info` as COLUMNS' `commit`."""
    cid = (commit_info or {}).get("id")
    if not cid:
        return "unknown"
    return cid[:7] + ("-dirty" if commit_info.get("dirty") else "")


# -------------------------------------------------------------------------------- pytest-benchmark -> rows
def rows_from_pytest_benchmark(data: dict, *, date: str | None = None, machine: str | None = None,
                               commit: str | None = None) -> list[dict]:
    """The rows of one pytest-benchmark result (the dict it writes with --benchmark-json, or hands to the
    `pytest_benchmark_update_json` hook).

    Per benchmark: benchmark = the test function without `test_`, case = its group, provider = extra_info's
    `backend` (else `provider`, else the test's parameter id), and the median / mean / min time in ms plus every
    measured extra_info figure (peak extra memory in MiB, items/s, ...). A paired benchmark (extra_info provider
    "paired", benchmarks/_paired.py) gives both sides' medians (metric `paired_median`) and the median, min and max
    of the per-round ratios reference / ours (provider = ours). `date`, `machine`, `commit` default to the
    result's own `datetime`, `machine_info`, `commit_info`."""
    date = date or (iso_utc(data["datetime"]) if data.get("datetime") else utc_now())
    machine = machine or machine_name(data.get("machine_info"))
    commit = commit or commit_from_info(data.get("commit_info"))
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        name = b.get("name", "")
        bench = name.split("[")[0]
        bench = bench[5:] if bench.startswith("test_") else bench
        case = b.get("group") or name
        stats = b.get("stats") or {}
        base = {"date": date, "machine": machine, "commit": commit, "benchmark": bench, "case": case}

        def add(provider, metric, value, unit, notes=""):
            if value is None:
                return
            out.append({**base, "provider": provider, "metric": metric, "value": float(value), "unit": unit,
                        "notes": notes})

        if info.get("provider") == "paired":
            ours = info.get("ours") or _PAIRED_OURS.get(case.split()[0], "ours")
            notes = f"rounds={info.get('rounds')}"
            add("reference", "paired_median", info.get("reference_median_ms"), "ms", notes)
            add(ours, "paired_median", info.get("ours_median_ms", info.get("cpp_median_ms")), "ms", notes)
            for k in ("median", "min", "max"):
                add(ours, f"paired_ratio_{k}", info.get(f"ratio_{k}"), "x", notes + "; reference/ours per round")
            continue
        provider = str(info.get("backend") or info.get("provider") or b.get("param") or name)
        notes = f"rounds={stats.get('rounds')}" if stats.get("rounds") is not None else ""
        for k in ("median", "mean", "min"):
            if stats.get(k) is not None:
                add(provider, k, stats[k] * 1e3, "ms", notes)
        for key, (metric, unit, scale) in _MEASURED.items():
            v = info.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                samples = info.get(key + "_samples")
                s = f"samples={';'.join(f'{x * scale:.1f}' for x in samples)}" if samples else ""
                add(provider, metric, v * scale, unit, s)
    return out


# ------------------------------------------------------------------------------------------ GPU suite -> rows
# fields of a GPU suite row that name the case (everything else numeric or boolean is a measurement)
_GPU_ID = ("case", "check", "time", "preset", "op", "n", "d", "batch", "frames", "dtype", "symmetric", "mode")
_GPU_PREFIX = ("reference_", "naive_", "cuda_", "triton_", "chunked_", "sdpa_", "flex_")


def _gpu_unit(metric):
    if metric.endswith("_ms") or metric == "ms":
        return metric[:-3] or "time", "ms"
    if metric.endswith("_mb"):
        return metric[:-3], "MiB"
    if metric.endswith("_gb"):
        return metric[:-3], "GiB"
    if "ratio" in metric or "speedup" in metric or "_vs_" in metric:
        return metric, "x"
    if metric.startswith("err") or metric.endswith("_err"):
        return metric, "rel. error"
    return metric, ""


def rows_from_gpu_part(part: str, rows: list[dict], *, date: str, machine: str, commit: str,
                       notes: str = "") -> list[dict]:
    """The rows of one part of benchmarks/gpu_suite.py (`htwa`, `losses`, `cuda`, `model`), from the dicts its
    runner returns. benchmark = `gpu_<part>` (plus the row's `kind` or `op`); case = the identifying fields
    (_GPU_ID); provider = the row's `backend`, or the prefix of a `cuda_...`/`reference_...` figure; booleans
    (checks passed, deterministic dbias) are 1/0 rows; strings other than the identity go to notes; a list of
    per-kernel times (`top_kernels`) gives `<benchmark>_profile` rows, the kernel named in notes."""
    out = []
    for r in rows:
        bench = "_".join(["gpu", part] + [str(r[k]) for k in ("kind", "op") if r.get(k)])
        ids = []
        for k in _GPU_ID:
            v = r.get(k)
            if v is None or k == "op":
                continue
            if k == "symmetric":
                ids.append("symmetric" if v else "one-way")
            elif k in ("n", "d", "batch", "frames"):
                ids.append(f"{'N' if k == 'n' else 'D' if k == 'd' else k}={v}")
            else:
                ids.append(str(v))
        case = " ".join(ids)
        text = [f"{k}={v}" for k, v in r.items() if isinstance(v, str) and k not in _GPU_ID
                and k not in ("part", "kind", "backend")]
        note = "; ".join(x for x in [notes] + text if x)
        default_provider = r.get("backend") or ("cuda" if part == "cuda" else "triton")
        for k, v in r.items():
            if k in _GPU_ID or k in ("part", "kind", "backend") or v is None or isinstance(v, (str, list, dict)):
                continue
            provider = default_provider
            metric = k
            for p in _GPU_PREFIX:
                if k.startswith(p):
                    provider, metric = p[:-1], k[len(p):]
                    break
            metric, unit = _gpu_unit(metric)
            if isinstance(v, bool):
                unit = "bool"
            out.append({"date": date, "machine": machine, "commit": commit, "benchmark": bench, "case": case,
                        "provider": provider, "metric": metric, "value": float(v), "unit": unit, "notes": note})
        for k, v in r.items():  # a profile: [{"kernel": name, "ms": per step, ...}, ...]
            if not (isinstance(v, list) and v and all(isinstance(x, dict) and "kernel" in x for x in v)):
                continue
            for x in v:
                ms = x.get("ms", x.get("ms_per_call"))
                if isinstance(ms, (int, float)):
                    out.append({"date": date, "machine": machine, "commit": commit, "benchmark": bench + "_profile",
                                "case": case, "provider": default_provider, "metric": "kernel_ms", "value": float(ms),
                                "unit": "ms", "notes": "; ".join(y for y in (note, f"kernel={x['kernel']}") if y)})
    return out


def rows_from_htwa_tune(report: dict, *, date: str, machine: str, commit: str, notes: str = "") -> list[dict]:
    """The rows of benchmarks/gpu_htwa_tune.py's report: each timed variant's forward (or forward+backward) ms and
    error per case (provider `triton:<variant>`), the reference's forward+backward ms, and the profile's per-kernel
    ms (kernel name in notes)."""
    base = {"date": date, "machine": machine, "commit": commit}
    shape = f"{report.get('dtype', '').replace('torch.', '')} B={report.get('batch')}"
    out = []
    for direction, metric in (("fwd", "fwd"), ("bwd", "fwdbwd")):
        for v in report.get(direction, []):
            if "skipped" in v:
                continue
            for k, x in v.items():
                if k in ("variant", "tune", "ok", "seconds") or k.endswith("_err") or not isinstance(x, (int, float)):
                    continue
                common = {**base, "benchmark": f"gpu_htwa_tune_{direction}", "case": f"{k} {shape}",
                          "provider": f"triton:{v['variant']}", "notes": notes}
                out.append({**common, "metric": metric, "value": float(x), "unit": "ms"})
                if isinstance(v.get(k + "_err"), (int, float)):
                    out.append({**common, "metric": "err_vs_default", "value": float(v[k + "_err"]),
                                "unit": "rel. error"})
    for case, ms in (report.get("reference_fwdbwd_ms") or {}).items():
        out.append({**base, "benchmark": "gpu_htwa_tune_bwd", "case": f"{case} {shape}", "provider": "reference",
                    "metric": "fwdbwd", "value": float(ms), "unit": "ms", "notes": notes})
    for case, kernels in (report.get("profile") or {}).items():
        for kern in kernels:
            out.append({**base, "benchmark": "gpu_htwa_tune_profile", "case": f"{case} {shape}",
                        "provider": "triton", "metric": "kernel_ms_per_call", "value": float(kern["ms_per_call"]),
                        "unit": "ms", "notes": "; ".join(x for x in (notes, f"kernel={kern['kernel']}") if x)})
    return out


def main(argv=None):
    """`python benchmarks/results.py add FILE [--to CSV] [--commit C]`: appends the rows of another results CSV (the
    GPU machine's `$OUT/results.csv`) to benchmarks/results.csv; --commit fills in rows written outside git."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="append the rows of another results CSV")
    add.add_argument("file")
    add.add_argument("--to", default=DEFAULT_CSV)
    add.add_argument("--commit", help="commit for rows written outside git (their commit is 'unknown')")
    args = p.parse_args(argv)
    rows = read_rows(args.file)
    if args.commit:
        rows = [{**r, "commit": args.commit} if r["commit"] == "unknown" else r for r in rows]
    n = append_rows(rows, args.to)
    print(f"appended {n} rows of {args.file} to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
