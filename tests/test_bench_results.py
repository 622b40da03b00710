"""The results CSV (benchmarks/results.py): its columns, the round trip append_rows -> report.py, and the mapping of
pytest-benchmark results and GPU suite rows to CSV rows."""

import csv
import os
import re

import pytest

from benchmarks import report, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name, group, stats, **info):
    """One benchmark as pytest-benchmark writes it (`Metadata.as_dict`), reduced to the keys the rows use."""
    return {"group": group, "name": name, "fullname": f"benchmarks/test_x.py::{name}",
            "param": name.split("[")[1][:-1] if "[" in name else None, "extra_info": info,
            "stats": {"min": stats[0], "max": stats[2] * 2, "mean": stats[1], "median": stats[2], "rounds": 3,
                      "stddev": 0.0, "iqr": 0.0, "ops": 1.0, "total": 1.0, "iterations": 1}}


SYNTHETIC = {
    "machine_info": {"cpu": {"brand_raw": "AMD EPYC", "count": 2}},
    "commit_info": {"id": "950806327d6ec06d1b8b16ccd39c9c4a1eb7358a", "dirty": False},
    "datetime": "2026-11-26T22:05:38.922405+00:00",
    "benchmarks": [
        _bench("test_info_nce[N4096-reference]", "info_nce N=4096 D=256 fp32 fwd+bwd", (0.50, 0.55, 0.56),
               op="info_nce", backend="reference", n=4096, peak_extra_bytes=263.5 * 2**20),
        _bench("test_info_nce[N4096-cpp]", "info_nce N=4096 D=256 fp32 fwd+bwd", (0.20, 0.25, 0.28),
               op="info_nce", backend="cpp", n=4096, peak_extra_bytes=13 * 2**20,
               peak_extra_bytes_samples=[12 * 2**20, 13 * 2**20, 14 * 2**20]),
        _bench("test_htwa_paired[layer2]", "htwa paired layer2 fwd+bwd B=1", (1.0, 1.0, 1.0), provider="paired",
               case="layer2", rounds=10, reference_median_ms=31.8, cpp_median_ms=18.3, ratio_median=1.72,
               ratio_min=1.61, ratio_max=1.85),
    ],
}


def test_rows_from_pytest_benchmark_maps_a_result():
    rows = results.rows_from_pytest_benchmark(SYNTHETIC)
    assert all(set(r) == set(results.COLUMNS) for r in rows)
    assert {(r["date"], r["machine"], r["commit"]) for r in rows} == {
        ("2026-11-26T22:05:38Z", "AMD EPYC (2 cores)", "9508063")}
    got = {(r["benchmark"], r["provider"], r["metric"]): (r["value"], r["unit"]) for r in rows}
    assert len(got) == len(rows) == 3 + 1 + 3 + 1 + 5
    assert got[("info_nce", "reference", "median")] == (pytest.approx(560.0), "ms")
    assert got[("info_nce", "reference", "mean")] == (pytest.approx(550.0), "ms")
    assert got[("info_nce", "cpp", "min")] == (pytest.approx(200.0), "ms")
    assert got[("info_nce", "reference", "peak_extra")] == (pytest.approx(263.5), "MiB")
    assert got[("info_nce", "cpp", "peak_extra")] == (pytest.approx(13.0), "MiB")
    # a paired group written before run_paired named ours: the htwa groups' ours is cpp, the old key cpp_median_ms
    assert got[("htwa_paired", "reference", "paired_median")] == (31.8, "ms")
    assert got[("htwa_paired", "cpp", "paired_median")] == (18.3, "ms")
    assert got[("htwa_paired", "cpp", "paired_ratio_median")] == (1.72, "x")
    assert got[("htwa_paired", "cpp", "paired_ratio_min")] == (1.61, "x")
    assert got[("htwa_paired", "cpp", "paired_ratio_max")] == (1.85, "x")
    cpp_mem = next(r for r in rows if r["provider"] == "cpp" and r["metric"] == "peak_extra")
    assert cpp_mem["notes"] == "samples=12.0;13.0;14.0"
    assert {r["case"] for r in rows if r["benchmark"] == "info_nce"} == {"info_nce N=4096 D=256 fp32 fwd+bwd"}


def test_rows_take_the_given_identity_and_the_paired_ours():
    data = {"benchmarks": [_bench("test_stage1_paired", "model paired stage-1 fwd+bwd B=1 frames=8", (1, 1, 1),
                                  provider="paired", ours="auto-x", rounds=4, reference_median_ms=4000.0,
                                  ours_median_ms=3500.0, ratio_median=1.1, ratio_min=0.9, ratio_max=1.3)]}
    rows = results.rows_from_pytest_benchmark(data, date="2026-01-02T03:04:05Z", machine="m", commit="abc1234")
    assert {(r["date"], r["machine"], r["commit"], r["benchmark"]) for r in rows} == {
        ("2026-01-02T03:04:05Z", "m", "abc1234", "stage1_paired")}
    assert sorted((r["provider"], r["metric"]) for r in rows) == [
        ("auto-x", "paired_median"), ("auto-x", "paired_ratio_max"), ("auto-x", "paired_ratio_median"),
        ("auto-x", "paired_ratio_min"), ("reference", "paired_median")]


def test_append_rows_then_report_reads_them_back(tmp_path, capsys):
    path = str(tmp_path / "r.csv")
    rows = results.rows_from_pytest_benchmark(SYNTHETIC)
    assert results.append_rows(rows[:4], path) == 4
    assert results.append_rows(rows[4:], path) == len(rows) - 4
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == results.COLUMNS and len(lines) == len(rows) + 1  # one header for both appends
    back = results.read_rows(path)
    assert [(r["benchmark"], r["provider"], r["metric"]) for r in back] == [
        (r["benchmark"], r["provider"], r["metric"]) for r in rows]
    assert [r["value"] for r in back] == pytest.approx([r["value"] for r in rows], rel=1e-5)

    assert report.main(["--csv", path, "--benchmark", "info_nce", "--commit", "95080", "--date", "2026-11-26",
                        "--machine", "epyc"]) == 0
    out = capsys.readouterr().out
    assert "info_nce: 2026-11-26T22:05:38Z, AMD EPYC (2 cores), commit 9508063" in out
    line = next(x for x in out.splitlines() if re.search(r"\bcpp\b", x))
    # median 280.0 ms, reference/cpp 560/280 = 2.00; memory 13.0 MiB, cpp/reference 13/263.5 = 0.05
    assert re.search(r"280\.0\s+2\.00\s+13\.00\s+0\.05$", line), line
    assert "htwa_paired" not in out

    assert report.main(["--csv", path, "--benchmark", "paired"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"cpp\s+18\.30\s+1\.74\s+1\.72x\s+1\.61x\s+1\.85x$", out, re.M), out
    assert report.main(["--csv", path, "--commit", "deadbee"]) == 1
    assert "no rows match" in capsys.readouterr().out


def test_report_select_filters_and_latest():
    rows = [{"date": d, "machine": m, "commit": c, "benchmark": b, "case": "x", "provider": "cpp",
             "metric": "median", "value": 1.0, "unit": "ms", "notes": ""}
            for d, m, c, b in [("2026-11-26T13:00:00Z", "AMD EPYC (2 cores)", "aaa1111", "htwa"),
                               ("2026-11-26T18:00:00Z", "AMD EPYC (2 cores)", "bbb2222", "htwa_paired"),
                               ("2026-12-05T13:49:13Z", "Intel(R) Xeon(R) Processor (2 cores)", "ccc3333", "info_nce"),
                               ("2026-11-26T15:00:00Z", "NVIDIA H100 80GB HBM3", "ddd4444", "gpu_htwa")]]
    dates = lambda sel: [r["date"][:13] for r in sel]  # noqa: E731
    assert dates(report.select(rows, date="2026-11-26T1")) == ["2026-11-26T13", "2026-11-26T18", "2026-11-26T15"]
    assert dates(report.select(rows, machine="epyc")) == ["2026-11-26T13", "2026-11-26T18"]
    assert dates(report.select(rows, commit="ccc")) == ["2026-12-05T13"]
    assert dates(report.select(rows, benchmark="htwa")) == ["2026-11-26T13", "2026-11-26T18", "2026-11-26T15"]
    assert dates(report.select(rows, machine="EPYC", latest=True)) == ["2026-11-26T18"]
    assert dates(report.select(rows, latest=True)) == ["2026-12-05T13"]


def test_append_rows_refuses_unknown_columns_and_honours_the_env(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown column"):
        results.append_rows([{"date": "d", "speed": 1}], str(tmp_path / "x.csv"))
    monkeypatch.setenv(results.ENV, "0")
    assert results.default_path() is None
    assert results.append_rows([{"date": "d", "value": 1.0}]) == 0
    monkeypatch.setenv(results.ENV, str(tmp_path / "y.csv"))
    assert results.default_path() == str(tmp_path / "y.csv")
    assert results.append_rows([{"date": "d", "value": 1.0}]) == 1
    assert results.read_rows(str(tmp_path / "y.csv"))[0]["value"] == 1.0
    monkeypatch.delenv(results.ENV)
    assert results.default_path() == results.DEFAULT_CSV


def test_rows_from_gpu_part():
    ident = {"date": "2026-11-26T15:13:16Z", "machine": "NVIDIA H100 80GB HBM3", "commit": "b0bf8ef"}
    htwa = [{"case": "layer0", "backend": "triton", "dtype": "bfloat16", "fwd_ms": 0.83, "fwdbwd_ms": 3.2,
             "max_err": 0.0058, "worst": "dq", "dbias_deterministic": True, "peak_extra_mb": 840.0},
            {"case": "layer3", "backend": "flex", "dtype": "bfloat16", "fwd_ms": None, "skipped": "time budget"}]
    rows = results.rows_from_gpu_part("htwa", htwa, **ident)
    got = {(r["benchmark"], r["case"], r["provider"], r["metric"]): (r["value"], r["unit"]) for r in rows}
    assert got == {("gpu_htwa", "layer0 bfloat16", "triton", "fwd"): (0.83, "ms"),
                   ("gpu_htwa", "layer0 bfloat16", "triton", "fwdbwd"): (3.2, "ms"),
                   ("gpu_htwa", "layer0 bfloat16", "triton", "max_err"): (0.0058, "rel. error"),
                   ("gpu_htwa", "layer0 bfloat16", "triton", "dbias_deterministic"): (1.0, "bool"),
                   ("gpu_htwa", "layer0 bfloat16", "triton", "peak_extra"): (840.0, "MiB")}
    assert {r["notes"] for r in rows} == {"worst=dq"}
    cuda = [{"part": "cuda", "op": "info_nce", "n": 4096, "d": 1024, "dtype": "bfloat16", "naive_fwdbwd_ms": 1.36,
             "cuda_fwdbwd_ms": 9.3, "cuda_peak_extra_mb": 88.0, "mem_ratio": 0.275,
             "top_kernels": [{"kernel": "k1", "ms": 0.5, "share": 0.9}]}]
    got = {(r["benchmark"], r["case"], r["provider"], r["metric"]): (r["value"], r["unit"], r["notes"])
           for r in results.rows_from_gpu_part("cuda", cuda, **ident)}
    assert got == {("gpu_cuda_info_nce", "N=4096 D=1024 bfloat16", "naive", "fwdbwd"): (1.36, "ms", ""),
                   ("gpu_cuda_info_nce", "N=4096 D=1024 bfloat16", "cuda", "fwdbwd"): (9.3, "ms", ""),
                   ("gpu_cuda_info_nce", "N=4096 D=1024 bfloat16", "cuda", "peak_extra"): (88.0, "MiB", ""),
                   ("gpu_cuda_info_nce", "N=4096 D=1024 bfloat16", "cuda", "mem_ratio"): (0.275, "x", ""),
                   ("gpu_cuda_info_nce_profile", "N=4096 D=1024 bfloat16", "cuda", "kernel_ms"): (0.5, "ms",
                                                                                                 "kernel=k1")}


def test_the_repository_csv_has_the_columns():
    path = os.path.join(ROOT, "benchmarks", "results.csv")
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == results.COLUMNS
    rows = results.read_rows(path)
    assert rows
    for r in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["date"]), r
        assert r["machine"] and r["commit"] and r["benchmark"] and r["provider"] and r["metric"], r
    assert {"reference", "cpp"} <= {r["provider"] for r in rows}


def test_results_add_appends_another_csv(tmp_path):
    src, dst = str(tmp_path / "gpu.csv"), str(tmp_path / "repo.csv")
    rows = results.rows_from_gpu_part("model", [{"part": "model", "preset": "p", "backend": "auto", "step_ms": 2.0}],
                                      date="2026-01-01T00:00:00Z", machine="GPU", commit="unknown")
    results.append_rows(rows, src)
    results.append_rows(results.rows_from_pytest_benchmark(SYNTHETIC), dst)
    before = len(results.read_rows(dst))
    assert results.main(["add", src, "--to", dst, "--commit", "abc1234"]) == 0
    after = results.read_rows(dst)
    assert len(after) == before + 1
    assert (after[-1]["commit"], after[-1]["benchmark"], after[-1]["metric"], after[-1]["value"]) == (
        "abc1234", "gpu_model", "step", 2.0)
