"""Stage-1 forward + backward of `lfvila-official` at batch 1 on the CPU: fused HTWA ("auto") vs "reference".

    pytest benchmarks/test_bench_model.py                          # 8 frames (light default)
    LFVILA_BENCH_FRAMES=32 pytest benchmarks/test_bench_model.py   # the official 32 frames (minutes per step)

Time: pytest-benchmark, one warm-up step then `LFVILA_BENCH_ROUNDS` (default 2) timed steps. Peak memory: one step
per backend in a fresh subprocess (peak RSS of the process, and its growth over the RSS after the model was built,
i.e. activations + gradients + temporaries). With fewer than 32 frames the temporal windows of the late layers are
clipped to the clip length (spec 1.3), which is the only change. Benchmarks measure; they assert nothing about speed.

When the fused loss ops are not importable (`lfvila_kernels.info_nce_loss` ...), the step's loss is the sum of the
four stage-1 features instead (the encoders, i.e. nearly all of the cost, are the same); the report says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

FRAMES = int(os.environ.get("LFVILA_BENCH_FRAMES", "8"))
ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "2"))
BACKENDS = ["auto", "reference"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(backend: str, frames: int):
    """Model (train mode, random init) and one batch-1 input of the official preset at `frames` frames."""
    from lfvila_model import create_model

    torch.manual_seed(0)
    model = create_model("lfvila-official", video={"num_frames": frames, "attention_backend": backend}).train()
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, frames, 192, 320, generator=g)
    ids = torch.randint(1000, 20000, (1, 4, 50), generator=g)
    mask = torch.ones_like(ids)
    return model, video, ids, mask


def _losses_available() -> bool:
    try:
        from lfvila_kernels import gather_with_grad, info_nce_loss, sample_mtc_indices, temporal_contrastive_loss  # noqa
        return True
    except ImportError:
        return False


def _step(model, video, ids, mask, fused_losses: bool) -> None:
    model.zero_grad(set_to_none=True)
    if fused_losses:
        loss = model(video, ids, mask, generator=torch.Generator().manual_seed(0))["loss"]
    else:
        loss = sum(f.sum() for f in model.stage1_features(video, ids, mask).values())
    loss.backward()


def _resolved_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from lfvila_kernels import _backends
    from lfvila_kernels.htwa import _CPU_ORDER, _CUDA_ORDER

    return _backends.choose("htwa_fwd", _CPU_ORDER, _CUDA_ORDER, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage1_fwd_bwd_time(benchmark, backend):
    model, video, ids, mask = _setup(backend, FRAMES)
    fused = _losses_available()
    benchmark.extra_info.update(frames=FRAMES, resolved_backend=_resolved_backend(backend), fused_losses=fused,
                                threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(model, video, ids, mask, fused), rounds=ROUNDS, iterations=1, warmup_rounds=1)


_MEM_SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import test_bench_model as b
model, video, ids, mask = b._setup({backend!r}, {frames})
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
b._step(model, video, ids, mask, b._losses_available())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_rss_mib": peak / 1024, "after_build_mib": built / 1024, "step_growth_mib": (peak - built) / 1024}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage1_fwd_bwd_peak_memory(backend, record_property):
    code = _MEM_SCRIPT.format(root=ROOT, bench=os.path.dirname(os.path.abspath(__file__)), backend=backend,
                              frames=FRAMES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k, v in res.items():
        record_property(k, round(v, 1))
    print(f"\n[{backend}, {FRAMES} frames] {res}")
