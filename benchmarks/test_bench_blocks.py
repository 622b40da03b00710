"""The Swin blocks of one `lfvila-official` layer at the official 32-frame shapes, forward + backward, batch 1,
fp32 on the CPU: layer 0 (2 blocks over 32x24x40 tokens, C = 128) and layer 2 (14 blocks over 32x6x10, C = 512),
even blocks unshifted and odd ones shifted as in the model. The plain nn.LayerNorm / nn.Linear / nn.GELU modules
(`reference`, the official blocks) against the fused block Functions (`fused`, lfvila_model/fused_block.py). The
attention is the C++ HTWA kernel on both sides, so only the block modules differ. A layer rather than one block,
because what the fused Functions save is what each block keeps until the backward: with one block the backward's
own temporaries set the peak. Time: pytest-benchmark, 1 warm-up + `LFVILA_BENCH_ROUNDS` (default 5) rounds; peak
extra memory: one call in a fresh subprocess (benchmarks/_memory.py), median of `LFVILA_BENCH_MEMORY_REPEATS`
(default 3). Benchmarks measure; they assert nothing about speed.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._memory import peak_extra_bytes
from benchmarks.workloads import BLOCK_LAYERS, block_layer_shape, block_spec, build

ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "5"))
MEMORY = os.environ.get("LFVILA_BENCH_MEMORY", "1") != "0"
MEMORY_REPEATS = int(os.environ.get("LFVILA_BENCH_MEMORY_REPEATS", "3"))
PARAMS = [(layer, variant) for layer in BLOCK_LAYERS for variant in ("reference", "fused")]


@pytest.mark.parametrize("layer,variant", PARAMS, ids=[f"layer{n}-{v}" for n, v in PARAMS])
def test_swin_layer_blocks(benchmark, layer, variant):
    spec = block_spec(layer, variant)
    run = build(spec)
    grid, dim, _, _, depth = block_layer_shape(layer)
    benchmark.group = f"swin layer{layer} {depth} blocks {grid[0]}x{grid[1]}x{grid[2]} C={dim} fp32 fwd+bwd"
    benchmark.extra_info.update(spec)
    if MEMORY:
        samples = []
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(spec, repeats=MEMORY_REPEATS, samples=samples)
        benchmark.extra_info["peak_extra_bytes_samples"] = samples
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
