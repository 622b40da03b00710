"""Print a comparison table from a pytest-benchmark JSON file (`pytest benchmarks/ --benchmark-json=F`).

    python benchmarks/report.py F [--markdown]

For every group it lists each provider's median time, the speed-up of the fused kernel (`cpp`, or the provider
given with --ours) over each other provider, and the peak extra memory with its ratio to the reference's. Paired
groups (reference and ours timed in alternating rounds) get a second table: both medians and the median, min and
max of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    paired = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("provider") == "paired":
            paired[b["group"]] = info
            continue
        provider = info.get("backend") or info.get("provider") or b["name"]
        groups[b["group"]][provider] = {"median_ms": b["stats"]["median"] * 1e3,
                                        "mem_mb": (info.get("peak_extra_bytes") or 0) / 2**20 or None}
    return data, groups, paired


def paired_table(paired):
    rows = [["group", "rounds", "reference ms", "ours ms", "reference/ours (median of rounds)", "min", "max"]]
    for name, p in paired.items():
        ours_ms = p.get("ours_median_ms", p.get("cpp_median_ms"))  # older result files name it after the backend
        rows.append([name, str(p["rounds"]), f"{p['reference_median_ms']:.1f}", f"{ours_ms:.1f}",
                     f"{p['ratio_median']:.2f}x", f"{p['ratio_min']:.2f}x", f"{p['ratio_max']:.2f}x"])
    return rows


def _print(rows, markdown):
    if markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + " --- |" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def table(groups, ours, baseline="reference"):
    """Rows of the comparison table. `ours` is a provider name or a tuple of names tried in order per group
    (the fused kernel is "cpp" in the op groups, "auto" in the model group)."""
    candidates = (ours,) if isinstance(ours, str) else tuple(ours)
    providers = []
    for g in groups.values():
        providers += [p for p in g if p not in providers]
    others = [p for p in providers if p not in candidates and p != baseline]
    head = ["group", "ours"] + [f"{p} ms" for p in [baseline] + others] + ["ours ms", f"{baseline}/ours"]
    head += [f"{p}/ours" for p in others] + ["ours MB", f"{baseline} MB", "mem ratio"]
    rows = [head]
    for name, g in groups.items():
        mine = next((c for c in candidates if c in g), None)
        if mine is None:
            continue
        t = g[mine]["median_ms"]
        row = [name, mine] + [f"{g[p]['median_ms']:.1f}" if p in g else "-" for p in [baseline] + others]
        row.append(f"{t:.1f}")
        row.append(f"{g[baseline]['median_ms'] / t:.2f}x" if baseline in g else "-")
        row += [f"{g[p]['median_ms'] / t:.2f}x" if p in g else "-" for p in others]
        mo, mb = g[mine]["mem_mb"], g.get(baseline, {}).get("mem_mb")
        row += [f"{mo:.1f}" if mo else "-", f"{mb:.1f}" if mb else "-", f"{mo / mb:.2f}" if mo and mb else "-"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file", help="pytest-benchmark JSON output")
    parser.add_argument("--ours", default="cpp,auto,fused",
                        help="the fused provider(s) whose speed-ups are reported, first present per group "
                             "(default: cpp,auto,fused)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    data, groups, paired = load(args.json_file)
    rows = table(groups, tuple(args.ours.split(",")))
    mi = data.get("machine_info", {})
    print(f"machine: {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{mi.get('cpu', {}).get('count', '?')} cores; python {mi.get('python_version', '?')}; "
          f"date {data.get('datetime', '?')}")
    if len(rows) > 1:
        _print(rows, args.markdown)
    if paired:
        print()
        _print(paired_table(paired), args.markdown)


if __name__ == "__main__":
    main()
