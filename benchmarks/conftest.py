import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402


def benchmark_result(session) -> dict | None:
    """This session's pytest-benchmark results as the dict its --benchmark-json would hold (without the per-round
    data, machine_info or commit_info: benchmarks/results.py names the machine and commit itself); None when the
    plugin is off or nothing was timed."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", False):
        return None
    benches = []
    for b in bs.benchmarks:
        if not b or getattr(b, "has_error", False):
            continue
        benches.append(b.as_dict(include_data=False))
    return {"benchmarks": benches} if benches else None


def pytest_sessionfinish(session, exitstatus):
    """Appends every measured figure of this run to benchmarks/results.csv (or to $LFVILA_RESULTS_CSV; set it to
    0 to write nothing): one row per benchmark, provider and metric (benchmarks/results.py)."""
    path = results.default_path()
    data = benchmark_result(session)
    if path is None or data is None:
        return
    rows = results.rows_from_pytest_benchmark(data, date=results.utc_now(), machine=results.machine_name(),
                                              commit=results.git_commit())
    n = results.append_rows(rows, path)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and n:
        tr.write_line(f"benchmarks: appended {n} rows to {path} (python benchmarks/report.py --commit "
                      f"{rows[0]['commit']} prints them)")
