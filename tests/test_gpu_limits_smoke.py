"""benchmarks/gpu_limits.py (issue 18's measurements at the GPU's limits) without a GPU: `--smoke` runs every
section end to end on toy sizes on the CPU and appends its rows to the CSV; the long-form frame search and the naive
loss's out-of-memory fallback are checked on fake tries. Nothing here asserts a speed."""

from __future__ import annotations

import csv
import math
from collections import Counter

import pytest
import torch

from benchmarks import gpu_limits as gl

SMOKE = gl.SMOKE_SIZES
LOSS_CASE = f"N{SMOKE.loss_n}_D{SMOKE.loss_d}"
STEP_CASE = f"{SMOKE.preset}_batch{SMOKE.step_batch}_frames{SMOKE.step_frames}"
LONG_FRAMES = (SMOKE.frame_unit, 2 * SMOKE.frame_unit)  # --smoke caps the search at 2 units
# memory figures on the CPU are resident-set high-water marks above a level, which allocator reuse can leave at 0
MEMORY_METRICS = {"peak_extra_mib", "peak_extra_gib", "step_peak_gib", "memory_vs_naive", "memory_vs_reference"}


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == gl.COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("limits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny shapes are faster on one thread of a busy 2-core machine
    try:
        assert gl.main(["--smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return _read(out / gl.CSV_NAME)


def _value(rows, benchmark, case, provider, metric):
    (row,) = [r for r in rows if (r["benchmark"], r["case"], r["provider"], r["metric"])
              == (benchmark, case, provider, metric)]
    return float(row["value"])


def _expected(rows):
    """(benchmark, case, provider, metric) of every row --smoke must write (the memory ratios only where the
    denominator's peak is above 0: on the CPU it can be 0)."""
    keys = []
    cases = [c.name for c in gl._htwa_cases(SMOKE)]
    keys.append(("limits_htwa_floor", f"d2d_copy_{SMOKE.copy_bytes}B", "torch", "copy_bandwidth"))
    for case in cases:
        keys += [("limits_htwa_floor", case, "floor", m) for m in ("bytes_moved", "floor_ms")]
        keys += [("limits_htwa_floor", case, p, "fwdbwd_ms") for p in ("auto", "reference", "sdpa")]
        keys += [("limits_htwa_floor", case, "auto", m)
                 for m in ("pct_of_floor", "speedup_vs_reference", "speedup_vs_sdpa")]
    for provider in ("auto", "naive"):
        keys += [("limits_info_nce", LOSS_CASE, provider, m) for m in ("fwdbwd_ms", "peak_extra_mib")]
    keys.append(("limits_info_nce", LOSS_CASE, "auto", "time_vs_naive"))
    if _value(rows, "limits_info_nce", LOSS_CASE, "naive", "peak_extra_mib") > 0:
        keys.append(("limits_info_nce", LOSS_CASE, "auto", "memory_vs_naive"))
    for variant in ("auto", "reference"):
        keys += [("limits_stage1_step", STEP_CASE, variant, m) for m in ("step_ms", "peak_extra_gib")]
    keys.append(("limits_stage1_step", STEP_CASE, "auto", "speedup_vs_reference"))
    if _value(rows, "limits_stage1_step", STEP_CASE, "reference", "peak_extra_gib") > 0:
        keys.append(("limits_stage1_step", STEP_CASE, "auto", "memory_vs_reference"))
    for variant in ("reference", "auto"):
        keys += [("limits_longform", f"batch{SMOKE.long_batch}_frames{f}", variant, "step_peak_gib")
                 for f in LONG_FRAMES]
        keys.append(("limits_longform", f"batch{SMOKE.long_batch}", variant, "max_frames"))
    keys.append(("limits_longform", f"batch{SMOKE.long_batch}", "auto", "frames_vs_reference"))
    return keys


def test_smoke_rows_one_per_case_and_metric(smoke_rows):
    got = Counter((r["benchmark"], r["case"], r["provider"], r["metric"]) for r in smoke_rows)
    want = _expected(smoke_rows)
    assert len(want) == len(set(want))
    assert sorted(got) == sorted(want)
    assert set(got.values()) == {1}


def test_smoke_values_finite_and_positive(smoke_rows):
    for r in smoke_rows:
        assert r["date"] and r["machine"] and r["commit"], r
        assert r["unit"], r
        v = float(r["value"])
        assert math.isfinite(v), r
        if r["metric"] in MEMORY_METRICS:
            assert v >= 0, r
        else:
            assert v > 0, r


def test_smoke_floor_arithmetic_by_hand(smoke_rows):
    """Layer 0 of the reduced grids with one head, batch 1, bf16: q, k, v, o, dO, dq, dk, dv of 4*6*10 tokens x 32
    channels at 2 bytes, the (3*5*9 rows x 1 head) fp32 bias table read and dbias written."""
    case = next(c for c in gl._htwa_cases(SMOKE) if c.name == "layer0")
    assert (case.grid, case.heads, case.head_dim, case.bias_window) == ((4, 6, 10), 1, 32, (2, 3, 5))
    by_hand = 8 * (4 * 6 * 10 * 32) * 2 + 2 * (3 * 5 * 9) * 4
    assert by_hand == 123960
    bench = "limits_htwa_floor"
    assert _value(smoke_rows, bench, "layer0", "floor", "bytes_moved") == by_hand
    bw = _value(smoke_rows, bench, f"d2d_copy_{SMOKE.copy_bytes}B", "torch", "copy_bandwidth")  # GB/s
    floor_ms = _value(smoke_rows, bench, "layer0", "floor", "floor_ms")
    assert floor_ms == pytest.approx(by_hand / (bw * 1e9) * 1e3, rel=1e-12)
    ours = _value(smoke_rows, bench, "layer0", "auto", "fwdbwd_ms")
    ref = _value(smoke_rows, bench, "layer0", "reference", "fwdbwd_ms")
    assert _value(smoke_rows, bench, "layer0", "auto", "pct_of_floor") == pytest.approx(100 * floor_ms / ours)
    assert _value(smoke_rows, bench, "layer0", "auto", "speedup_vs_reference") == pytest.approx(ref / ours)


def test_smoke_longform_rows(smoke_rows):
    for variant in ("reference", "auto"):
        assert _value(smoke_rows, "limits_longform", f"batch{SMOKE.long_batch}", variant, "max_frames") == \
            LONG_FRAMES[-1]
    assert _value(smoke_rows, "limits_longform", f"batch{SMOKE.long_batch}", "auto", "frames_vs_reference") == 1.0


def test_smoke_budget_spent_stops_cleanly(tmp_path, capsys):
    """No time left: every section says it skipped, the call still succeeds, and no row is half written."""
    assert gl.main(["--smoke", "--out", str(tmp_path), "--budget", "0"]) == 0
    assert "skipped" in capsys.readouterr().out
    path = tmp_path / gl.CSV_NAME
    assert not path.exists() or all(r["metric"] != "max_frames" for r in _read(path))


def test_floor_bytes_formula():
    case = next(c for c in gl._htwa_cases(gl.GPU_SIZES) if c.name == "layer0")
    # the figure: 491,520 tokens x 128 channels in bf16 at batch 16 move about 1.0 GB
    assert 16 * case.tokens * case.heads * case.head_dim == 491520 * 128
    assert gl.htwa_floor_bytes(case, 16, 2, 135 * 4) == 8 * 491520 * 128 * 2 + 2 * 135 * 4 * 4


# -- the long-form search on fake tries


def _fake(limit, base=2e9, per_frame=5e7, with_peak=True, error_at=None):
    tried = []

    def try_frames(frames):
        tried.append(frames)
        if error_at is not None and frames >= error_at:
            return {"fits": False, "oom": False, "peak": None, "note": "error"}
        if frames > limit:
            return {"fits": False, "oom": True, "peak": None, "note": "out of memory"}
        return {"fits": True, "peak": base + per_frame * frames if with_peak else None, "note": "fits"}

    return try_frames, tried


@pytest.mark.parametrize("limit", [32, 63, 200, 1000, 1500, 4100])
@pytest.mark.parametrize("with_peak", [True, False])
def test_largest_fit_finds_the_largest_multiple(limit, with_peak):
    base, per_frame = 2e9, 5e7
    try_frames, tried = _fake(limit, base, per_frame, with_peak)
    cap = base + per_frame * (limit + 0.5)  # the frame count that just fits is `limit`
    out = gl.largest_fit(try_frames, 32, cap_bytes=cap)
    assert out["frames"] == limit // 32 * 32
    assert out["exact"]
    assert all(f % 32 == 0 for f in tried) and len(tried) == len(set(tried))
    assert [f for f, _ in out["tries"]] == tried
    # the line through the peaks lands next to the limit; without peaks, doubling then bisection
    assert len(tried) <= (6 if with_peak else 2 * math.ceil(math.log2(limit / 32 + 1)) + 4)


def test_largest_fit_nothing_fits():
    try_frames, tried = _fake(16)
    out = gl.largest_fit(try_frames, 32)
    assert out["frames"] is None and tried == [32] and "do not fit" in out["stop"]


def test_largest_fit_search_cap_and_budget():
    try_frames, tried = _fake(10_000, with_peak=False)
    out = gl.largest_fit(try_frames, 32, max_frames=300)
    assert out["frames"] == 288 and not out["exact"] and "search cap" in out["stop"]
    assert max(tried) == 288
    try_frames, tried = _fake(10_000)
    out = gl.largest_fit(try_frames, 32, enough_time=lambda frames: frames <= 64)
    assert out["frames"] == 64 and out["stop"] == "time budget" and not out["exact"]


def test_largest_fit_stops_at_an_error():
    """An error that is not an out-of-memory is no memory limit: the search stops with what fitted before."""
    try_frames, tried = _fake(10_000, error_at=100, with_peak=False)
    out = gl.largest_fit(try_frames, 32)
    assert out["frames"] == 64 and tried == [32, 64, 128] and out["stop"] == "error at 128 frames"
    assert not out["exact"]


def test_naive_fallback_halves_until_it_fits():
    calls = []

    def measure(n):
        calls.append(n)
        return {"note": "out of memory"} if n > 5000 else {"ms": 1.0, "peak": 10}

    n, r, tries = gl.naive_fallback(measure, 65536, 1024)
    assert (n, r["ms"]) == (4096, 1.0) and calls == [65536, 32768, 16384, 8192, 4096]
    assert [m for m, _ in tries] == calls
    calls.clear()
    n, r, tries = gl.naive_fallback(lambda m: {"note": "out of memory"}, 4096, 1024)
    assert n is None and [m for m, _ in tries] == [4096, 2048, 1024]
    n, r, tries = gl.naive_fallback(lambda m: {"note": "error: boom"}, 4096, 1024)
    assert n is None and len(tries) == 1 and r["note"] == "error: boom"


def test_budget_shares_follow_the_sections_run():
    b = gl.Budget(100.0, ["floor", "loss", "step", "longform"])
    ends = []
    for s in gl.SECTIONS:
        b.enter(s)
        ends.append(b.section_end)
    assert ends == pytest.approx([30.0, 45.0, 70.0, 100.0])
    b = gl.Budget(100.0, ["longform", "floor"])  # renormalised: floor 30 / 60, longform the rest
    b.enter("floor")
    assert b.section_end == pytest.approx(50.0)
    b.enter("longform")
    assert b.section_end == pytest.approx(100.0)
