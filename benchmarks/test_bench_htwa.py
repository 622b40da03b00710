"""HTWA timing and memory on the CPU: one pytest-benchmark group per official layer shape and mode.

Providers: `reference` (the naive official path: roll, partition, matmul, bias, -100 mask, softmax, reverse),
`sdpa` (same partitioning, scaled_dot_product_attention with a dense bias+mask; partition cost included),
`flex` (FlexAttention with the bias as score_mod, compiled; forward only: no CPU backward), and `cpp` (ours).
Peak extra memory per forward+backward case is measured in a fresh subprocess and stored in extra_info.
Benchmarks measure; they never assert speed. The run's rows go to
benchmarks/results.csv; `python benchmarks/report.py --latest` prints its table.

`test_htwa_paired` times the reference and ours alternately, round by round (forward+backward), and records the
median of the per-round ratios: this VM's speed drifts by up to +-20 % over minutes, so two medians taken a minute
apart (the groups above) can disagree by more than the effect measured; alternating rounds see the same machine.

Environment knobs: LFVILA_BENCH_BATCH (default 1), LFVILA_BENCH_ROUNDS (default 15: with 5, one slow second of
the VM set a group's median), LFVILA_BENCH_PAIRED_ROUNDS (default 10), LFVILA_BENCH_MEMORY=0 to skip the memory
probes, LFVILA_BENCH_MEMORY_REPEATS (default 3: the median over that many fresh processes, all kept in extra_info),
LFVILA_BENCH_LAYERS=0,5 to run some layers only.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._memory import peak_extra_bytes
from benchmarks._paired import run_paired
from benchmarks.workloads import build, htwa_spec
from lfvila_kernels.shapes import official_cases

BATCH = int(os.environ.get("LFVILA_BENCH_BATCH", "1"))
ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "15"))
PAIRED_ROUNDS = int(os.environ.get("LFVILA_BENCH_PAIRED_ROUNDS", "10"))
MEMORY = os.environ.get("LFVILA_BENCH_MEMORY", "1") != "0"
MEMORY_REPEATS = int(os.environ.get("LFVILA_BENCH_MEMORY_REPEATS", "3"))
LAYERS = {int(x) for x in os.environ.get("LFVILA_BENCH_LAYERS", "0,1,2,3,4,5").split(",")}

CASES = [c for c in official_cases() if c.layer in LAYERS]
PROVIDERS = ["reference", "sdpa", "flex", "cpp"]
PARAMS = [
    (case, backend, mode)
    for case in CASES
    for mode in ("fwd", "fwd+bwd")
    for backend in PROVIDERS
    if not (backend == "flex" and mode == "fwd+bwd")
]


@pytest.mark.parametrize("case,backend,mode", PARAMS, ids=[f"{c.name}-{m}-{b}" for c, b, m in PARAMS])
def test_htwa(benchmark, case, backend, mode):
    spec = htwa_spec(case.name, backend, mode, BATCH)
    run = build(spec)
    benchmark.group = f"htwa {case.name} {mode} B={BATCH}"
    benchmark.extra_info.update(spec)
    benchmark.extra_info["tokens"] = case.tokens * BATCH
    if MEMORY and mode == "fwd+bwd":
        samples = []
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(spec, repeats=MEMORY_REPEATS, samples=samples)
        benchmark.extra_info["peak_extra_bytes_samples"] = samples
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_htwa_paired(benchmark, case):
    runs = {b: build(htwa_spec(case.name, b, "fwd+bwd", BATCH)) for b in ("reference", "cpp")}
    run_paired(benchmark, runs, "cpp", PAIRED_ROUNDS, f"htwa paired {case.name} fwd+bwd B={BATCH}", case=case.name)
