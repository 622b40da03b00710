"""Print comparison tables from the results CSV (benchmarks/results.csv, written by `pytest benchmarks/` and the GPU
suite; columns in benchmarks/results.py).

    python benchmarks/report.py [--latest] [--date 2026-11-26] [--machine EPYC] [--commit 9508063]
                                [--benchmark htwa] [--metric median,peak_extra] [--markdown] [--csv FILE]

Filters (all optional, combined with "and"): --date and --commit match a prefix (`2026-11-26`, `2026-11-26T18`,
`95080`), --machine and --benchmark a substring, case-insensitive (`epyc`, `h100`; `htwa` matches `htwa`,
`htwa_paired`, `gpu_htwa`). --latest keeps only the newest run left after the filters (`make bench` prints its own
run this way). Without any filter the newest run is shown.

One table per run (rows sharing date, machine and commit) and benchmark, one line per case and provider, one
column per metric. Next to a time (ms, s) its ratio reference / provider (the speed-up over the reference: > 1 is
faster), next to a memory figure (MiB, GiB) its ratio provider / reference (< 1 is less memory), where the same run
measured the reference provider on the same case (--reference names it: first of `reference,naive` present).
Paired groups show each side's median (`paired_median`) and the median, min and max of the per-round ratios
reference / ours (`paired_ratio_*`). The mean and min times are in the CSV; `--metric all` shows them too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results import DEFAULT_CSV, default_path, read_rows  # noqa: E402

HIDDEN = ("mean", "min")  # in the CSV, left out of the tables unless asked for
TIME_UNITS = ("ms", "s")
MEMORY_UNITS = ("MiB", "GiB", "MB", "GB")


def select(rows, date=None, machine=None, commit=None, benchmark=None, latest=False):
    """The rows matching every given filter (date and commit: prefix; machine and benchmark: substring, case-
    insensitive); with `latest`, only those of the newest run (date) among them."""
    def ok(r):
        return ((not date or r["date"].startswith(date)) and (not commit or r["commit"].startswith(commit))
                and (not machine or machine.lower() in r["machine"].lower())
                and (not benchmark or benchmark.lower() in r["benchmark"].lower()))

    out = [r for r in rows if ok(r)]
    if latest and out:
        newest = max(r["date"] for r in out)
        out = [r for r in out if r["date"] == newest]
    return out


def _fmt(v, unit=""):
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "bool":
        return "yes" if v else "no"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 1e-3:
        return f"{v:.4f}"
    return f"{v:.1e}"


def tables(rows, metrics=None, reference=("reference", "naive")):
    """[(title, table rows)] for the given rows: one per run and benchmark (see the module docstring)."""
    runs = {}
    for r in rows:
        runs.setdefault((r["date"], r["machine"], r["commit"]), {}).setdefault(r["benchmark"], []).append(r)
    out = []
    for (date, machine, commit), benches in sorted(runs.items()):
        for bench, brs in benches.items():
            shown = [r for r in brs if (r["metric"] in metrics if metrics else r["metric"] not in HIDDEN)]
            if not shown:
                continue
            cols, units, cases, providers, cell = [], {}, [], {}, {}
            for r in shown:
                if r["metric"] not in cols:
                    cols.append(r["metric"])
                units.setdefault(r["metric"], r["unit"])
                if r["case"] not in cases:
                    cases.append(r["case"])
                providers.setdefault(r["case"], [])
                if r["provider"] not in providers[r["case"]]:
                    providers[r["case"]].append(r["provider"])
                cell[(r["case"], r["provider"], r["metric"])] = r["value"]
            head = ["case", "provider"]
            for m in cols:
                u = units[m]
                head.append(f"{m} {u}" if u in TIME_UNITS + MEMORY_UNITS + ("1/s",) else m)
                if u in TIME_UNITS:
                    head.append("ref/this")
                elif u in MEMORY_UNITS:
                    head.append("this/ref")
            body = [head]
            for case in cases:
                ref = next((p for p in reference if p in providers[case]), None)
                order = sorted(providers[case], key=lambda p: p != ref)
                for p in order:
                    line = [case, p]
                    for m in cols:
                        u = units[m]
                        v = cell.get((case, p, m))
                        line.append("-" if v is None else _fmt(v, u))
                        if u in TIME_UNITS or u in MEMORY_UNITS:
                            rv = cell.get((case, ref, m)) if ref else None
                            if v is None or rv is None or p == ref or not v or not rv:
                                line.append("-")
                            else:
                                line.append(f"{(rv / v if u in TIME_UNITS else v / rv):.2f}")
                    body.append(line)
            out.append((f"{bench}: {date}, {machine}, commit {commit}", body))
    return out


def _print(rows, markdown):
    if markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + " --- |" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=default_path() or DEFAULT_CSV,
                   help="results CSV (default: $LFVILA_RESULTS_CSV when set, else benchmarks/results.csv)")
    p.add_argument("--date", help="date prefix (UTC), e.g. 2026-11-26 or 2026-11-26T18")
    p.add_argument("--machine", help="substring of the machine name, e.g. EPYC, Xeon, H100")
    p.add_argument("--commit", help="commit hash prefix")
    p.add_argument("--benchmark", help="substring of the benchmark name, e.g. htwa, info_nce, stage1, gpu_")
    p.add_argument("--latest", action="store_true", help="only the newest run left after the filters")
    p.add_argument("--metric", help="comma-separated metrics to show, or 'all' (default: all but mean and min)")
    p.add_argument("--reference", default="reference,naive",
                   help="provider(s) the ratios are taken against, first present per case (default: reference,naive)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = p.parse_args(argv)
    if not os.path.exists(args.csv):
        print(f"report: no results file {args.csv}")
        return 1
    filters = (args.date, args.machine, args.commit, args.benchmark)
    rows = select(read_rows(args.csv), args.date, args.machine, args.commit, args.benchmark,
                  latest=args.latest or not any(filters))
    if not rows:
        print("report: no rows match")
        return 1
    metrics = None
    if args.metric == "all":
        metrics = sorted({r["metric"] for r in rows})
    elif args.metric:
        metrics = args.metric.split(",")
    for i, (title, body) in enumerate(tables(rows, metrics, tuple(args.reference.split(",")))):
        print(("\n" if i else "") + title)
        _print(body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
