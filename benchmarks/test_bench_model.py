"""Stage-1 forward + backward of `lfvila-official` at batch 1 on the CPU, at the official 32 frames of 192x320.

    pytest benchmarks/test_bench_model.py                         # 32 frames, the official input
    LFVILA_BENCH_FRAMES=8 pytest benchmarks/test_bench_model.py   # lighter: the late layers' windows clip to 8

Variants (the `provider` column of benchmarks/results.csv):
- `reference`: the official computation: `attention_backend="reference"` (roll, window partition, masked softmax)
  and the plain nn.LayerNorm / nn.Linear / nn.GELU block modules and BERT layers (`video.fused_blocks=False`,
  `text.fused_ffn=False`).
- `auto`: this project's defaults: the fused C++ HTWA kernel (packed qkv entry point), the fused losses and the
  memory-saving block Functions (`video.fused_blocks`, `text.fused_ffn`; lfvila_model/fused_block.py).
- `auto-plain-blocks`: the fused attention alone (both False), to show what each part contributes.

Time: pytest-benchmark, one warm-up step then `LFVILA_BENCH_ROUNDS` (default 2) timed steps. `test_stage1_paired`
builds the reference and `auto` models in one process (same seed, so the same weights) and alternates their steps
for `LFVILA_BENCH_PAIRED_ROUNDS_MODEL` (default 4) rounds, reporting the median of the per-round ratios: groups
run minutes apart, and this VM's speed drifts by more than the difference measured. Peak extra memory: one step
in each of `LFVILA_BENCH_MEMORY_REPEATS_MODEL` (default 3) fresh subprocesses, the median (benchmarks/_memory.py;
every sample in extra_info): the RSS high-water mark is reset after the model is built, so the number is the
step's own (activations, the 1183 MiB of fp32 parameter gradients, temporaries). With fewer than 32 frames the
temporal windows of the late layers are clipped to the grid (spec 1.3), which is the only change. Benchmarks
measure; they assert nothing about speed.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._memory import peak_extra_bytes
from benchmarks._paired import run_paired
from benchmarks.workloads import MODEL_VARIANTS, build, model_spec

FRAMES = int(os.environ.get("LFVILA_BENCH_FRAMES", "32"))
ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "2"))
PAIRED_ROUNDS = int(os.environ.get("LFVILA_BENCH_PAIRED_ROUNDS_MODEL", "4"))
MEMORY_REPEATS = int(os.environ.get("LFVILA_BENCH_MEMORY_REPEATS_MODEL", "3"))
MEMORY = os.environ.get("LFVILA_BENCH_MEMORY", "1") != "0"

VARIANTS = {name: model_spec(backend, FRAMES, fused) for name, (backend, fused) in MODEL_VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stage1_fwd_bwd(benchmark, variant):
    spec = VARIANTS[variant]
    run = build(spec)
    benchmark.group = f"model lfvila-official stage-1 fwd+bwd B=1 frames={FRAMES}"
    benchmark.extra_info.update(spec)
    benchmark.extra_info["backend"] = variant  # the report's provider column
    if MEMORY:
        samples = []
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(spec, timeout=3600, repeats=MEMORY_REPEATS,
                                                                    samples=samples)
        benchmark.extra_info["peak_extra_bytes_samples"] = samples
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_stage1_paired(benchmark):
    runs = {b: build(VARIANTS[b]) for b in ("reference", "auto")}
    run_paired(benchmark, runs, "auto", PAIRED_ROUNDS, f"model paired stage-1 fwd+bwd B=1 frames={FRAMES}",
               frames=FRAMES)
