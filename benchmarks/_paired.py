"""Paired rounds: the reference and ours timed alternately in one process, for ratios that the VM's drift between
two tests a minute apart cannot skew (benchmarks/test_bench_htwa.py, test_bench_model.py)."""

from __future__ import annotations

import statistics
import time


def run_paired(benchmark, runs: dict, ours: str, rounds: int, group: str, **info) -> None:
    """Warms up both callables of `runs` ({"reference": fn, ours: fn}), then times `rounds` rounds of one call each,
    alternating which goes first, inside one pytest-benchmark call. Records in extra_info both medians and the
    median, min and max of the per-round ratios reference / ours (benchmarks/report.py prints them), plus `info`;
    `ours` names the fused provider (benchmarks/results.py files the ratios under it)."""
    for run in runs.values():
        run()  # warm-up
    times = {b: [] for b in runs}

    def paired():
        for i in range(rounds):
            for b in (("reference", ours) if i % 2 == 0 else (ours, "reference")):
                t0 = time.perf_counter()
                runs[b]()
                times[b].append(time.perf_counter() - t0)

    benchmark.group = group
    benchmark.pedantic(paired, rounds=1, warmup_rounds=0, iterations=1)
    ratios = sorted(r / o for r, o in zip(times["reference"], times[ours]))
    benchmark.extra_info.update({
        "provider": "paired", "ours": ours, **info, "rounds": rounds,
        "reference_median_ms": statistics.median(times["reference"]) * 1e3,
        "ours_median_ms": statistics.median(times[ours]) * 1e3,
        "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
    })
