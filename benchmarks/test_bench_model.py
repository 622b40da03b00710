"""Stage-1 forward + backward of `lfvila-official` at batch 1 on the CPU: fused ops (attention backend "auto" =
the C++ kernel, fused losses) vs `attention_backend="reference"`.

    pytest benchmarks/test_bench_model.py                          # 8 frames (light default)
    LFVILA_BENCH_FRAMES=32 pytest benchmarks/test_bench_model.py   # the official 32 frames (minutes per step)

Time: pytest-benchmark, one warm-up step then `LFVILA_BENCH_ROUNDS` (default 2) timed steps. `test_stage1_paired`
builds both models in one process (same seed, so the same weights) and alternates their steps for
`LFVILA_BENCH_PAIRED_ROUNDS` (default 4) rounds, reporting the median of the per-round ratios: the two groups run a
minute apart, and this VM's speed drifts by more than the difference measured (the reference's 8-frame step took
3.9-4.0 s in one full run and 4.8-5.0 s in another). Peak extra memory:
one step in a fresh subprocess (benchmarks/_memory.py): the RSS high-water mark is reset after the model is built,
so the number is the step's own (activations, gradients, temporaries). With fewer than 32 frames the temporal
windows of the late layers are clipped to the grid (spec 1.3), which is the only change. Benchmarks measure;
they assert nothing about speed.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._memory import peak_extra_bytes
from benchmarks._paired import run_paired
from benchmarks.workloads import build, model_spec

FRAMES = int(os.environ.get("LFVILA_BENCH_FRAMES", "8"))
ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "2"))
PAIRED_ROUNDS = int(os.environ.get("LFVILA_BENCH_PAIRED_ROUNDS_MODEL", "4"))
MEMORY = os.environ.get("LFVILA_BENCH_MEMORY", "1") != "0"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_stage1_fwd_bwd(benchmark, backend):
    spec = model_spec(backend, FRAMES)
    run = build(spec)
    benchmark.group = f"model lfvila-official stage-1 fwd+bwd B=1 frames={FRAMES}"
    benchmark.extra_info.update(spec)
    if MEMORY:
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(spec, timeout=3600)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_stage1_paired(benchmark):
    runs = {b: build(model_spec(b, FRAMES)) for b in ("reference", "auto")}
    run_paired(benchmark, runs, "auto", PAIRED_ROUNDS, f"model paired stage-1 fwd+bwd B=1 frames={FRAMES}",
               frames=FRAMES)
