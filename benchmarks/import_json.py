"""Converts benchmark JSON files into rows of benchmarks/results.csv (benchmarks/results.py).

    python benchmarks/import_json.py FILE.json [...] [--to CSV] [--date D] [--machine M] [--commit C] [--dry-run]

Reads pytest-benchmark JSON (`pytest benchmarks/ --benchmark-json=F`: date, machine and commit from its
`datetime`, `machine_info`, `commit_info`), the GPU suite's reports (`gpu_suite.py --json`, one per run: device and
date from the report) and gpu_htwa_tune.py's `htwa_tune.json` (no date of its own: give --date). A GPU report names
no commit: the last commit before its date is used (--commit overrides). Files are converted in date order; the
number of rows per file is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402


def _commit_before(date: str) -> str:
    proc = subprocess.run(["git", "rev-list", "-1", f"--before={date}", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(results.HERE))
    return proc.stdout.strip()[:7] or "unknown"


def rows_of(data: dict, date=None, machine=None, commit=None) -> list[dict]:
    if "benchmarks" in data:
        return results.rows_from_pytest_benchmark(data, date=date, machine=machine, commit=commit)
    machine = machine or data.get("device", "unknown")
    if "parts" in data:  # gpu_suite.py report
        date = date or results.iso_utc(data["date"].replace(" ", "T"))
        commit = commit or _commit_before(date)
        notes = f"htwa_tune={json.dumps(data['htwa_tune'], separators=(',', ':'))}" if data.get("htwa_tune") else ""
        out = []
        for part, p in data["parts"].items():
            out += results.rows_from_gpu_part(part, p.get("rows", []), date=date, machine=machine, commit=commit,
                                              notes=notes)
        return out
    if "bwd" in data and "profile" in data:  # gpu_htwa_tune.py report
        if not date:
            raise SystemExit("import_json: an htwa_tune report has no date; pass --date")
        date = results.iso_utc(date)
        return results.rows_from_htwa_tune(data, date=date, machine=machine, commit=commit or _commit_before(date))
    raise SystemExit("import_json: not a pytest-benchmark JSON, gpu_suite report or htwa_tune report")


def _when(data):
    return data.get("datetime") or (data.get("date") or "").replace(" ", "T") or "9999"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--to", default=results.DEFAULT_CSV, help="CSV to append to (default benchmarks/results.csv)")
    p.add_argument("--date", help="ISO date-time (UTC) for files that have none")
    p.add_argument("--machine", help="machine name overriding the file's")
    p.add_argument("--commit", help="commit overriding the file's")
    p.add_argument("--dry-run", action="store_true", help="count the rows, write nothing")
    args = p.parse_args(argv)
    loaded = []
    for f in args.files:
        with open(f) as fh:
            loaded.append((f, json.load(fh)))
    total = 0
    for f, data in sorted(loaded, key=lambda x: results.iso_utc(_when(x[1])) if _when(x[1]) != "9999" else "9999"):
        rows = rows_of(data, args.date, args.machine, args.commit)
        if not args.dry_run:
            results.append_rows(rows, args.to)
        total += len(rows)
        print(f"{f}: {len(rows)} rows ({rows[0]['date'] if rows else '-'}, {rows[0]['machine'] if rows else '-'}, "
              f"{rows[0]['commit'] if rows else '-'})")
    print(f"{'would append' if args.dry_run else 'appended'} {total} rows to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
