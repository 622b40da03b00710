"""info_nce_loss on the CPU: naive (`reference`, materialises the N x N logits) vs fused (`cpp`), forward +
backward, fp32, D = 256, N in {1024, 4096, 16384}. One pytest-benchmark group per N; the peak extra memory of each
case (measured in a fresh subprocess, see loss_workloads.peak_extra_bytes) goes into extra_info.
Benchmarks measure; they never assert speed.

Environment knobs: LFVILA_BENCH_LOSS_N=1024,4096 to run some sizes only, LFVILA_BENCH_ROUNDS (default 3; the
N = 16384 cases run one round, a naive round takes tens of seconds on 2 cores), LFVILA_BENCH_MEMORY=0 to skip the
memory probes.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.loss_workloads import build_loss, loss_spec, peak_extra_bytes

D = 256
SIZES = [int(x) for x in os.environ.get("LFVILA_BENCH_LOSS_N", "1024,4096,16384").split(",")]
ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "3"))
MEMORY = os.environ.get("LFVILA_BENCH_MEMORY", "1") != "0"
PARAMS = [(n, backend) for n in SIZES for backend in ("reference", "cpp")]


@pytest.mark.parametrize("n,backend", PARAMS, ids=[f"N{n}-{b}" for n, b in PARAMS])
def test_info_nce(benchmark, n, backend):
    spec = loss_spec(n, D, backend)
    run = build_loss(spec)
    benchmark.group = f"info_nce N={n} D={D} fp32 fwd+bwd"
    benchmark.extra_info.update(spec)
    benchmark.extra_info["mode"] = "fwd+bwd"
    if MEMORY:
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(spec)
    rounds = 1 if n >= 16384 else ROUNDS
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0 if n >= 16384 else 1, iterations=1)
