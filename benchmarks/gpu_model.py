"""GPU suite part: one stage-1 training step of `lfvila-official` (batch 8, bf16 autocast): median step time (CUDA
events) and peak allocated memory of three variants, as in benchmarks/test_bench_model.py:
- `auto`: the fused ops (attention backend "auto" = Triton on CUDA, fused losses, fused block Functions);
- `reference`: the official computation (`attention_backend="reference"`, plain block modules);
- `auto-plain-blocks`: the fused attention alone (`fused_blocks=False`).
With dry_run, a 4-frame tiny model runs one step per variant on the CPU, to exercise the code path."""

from __future__ import annotations

import statistics
import time

import torch


def _setup(backend: str, fused_blocks: bool, device: str, dry_run: bool):
    from lfvila_model import create_model

    torch.manual_seed(0)
    if dry_run:
        name, batch, frames, size = "lfvila-tiny", 2, 4, (96, 160)
    else:
        name, batch, frames, size = "lfvila-official", 8, 32, (192, 320)
    video_cfg = {"num_frames": frames, "attention_backend": backend, "fused_blocks": fused_blocks}
    model = create_model(name, video=video_cfg, text={"fused_ffn": fused_blocks}).to(device).train()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, frames, *size, generator=g).to(device)
    ids = torch.randint(1000, 20000, (batch, cfg.num_sentences, cfg.max_sentence_len), generator=g).to(device)
    return model, video, ids, torch.ones_like(ids)


def _time_step(model, video, ids, mask, device: str, rounds: int) -> list[float]:
    use_amp = device == "cuda"
    times = []
    for i in range(rounds + 1):  # the first step warms up (Triton compiles, cuDNN picks algorithms)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(video, ids, mask, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i:
            times.append(ms)
    return times


def _profile_step(model, video, ids, mask, top: int = 12) -> list[dict]:
    """Device time of one more step by kernel (torch.profiler), largest first: where the step's time goes, so the
    next optimisation is chosen from a measurement."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _time_step(model, video, ids, mask, "cuda", 1)
    events = [(e.key, e.device_time_total / 2e3) for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda x: -x[1])  # the profiled call ran the step twice (warm-up + 1): per step = total / 2
    total = sum(ms for _, ms in events)
    return [{"kernel": k[:100], "ms": round(ms, 3), "share": round(ms / total, 3)} for k, ms in events[:top]]


def run_model_suite(device: str, dry_run: bool) -> list[dict]:
    rows = []
    rounds = 1 if dry_run else 5
    from benchmarks.workloads import MODEL_VARIANTS

    for variant, (backend, fused_blocks) in MODEL_VARIANTS.items():
        row = {"part": "model", "preset": "lfvila-tiny" if dry_run else "lfvila-official", "backend": variant}
        rows.append(row)
        try:  # one variant running out of memory must not lose the others' rows
            model, video, ids, mask = _setup(backend, fused_blocks, device, dry_run)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times = _time_step(model, video, ids, mask, device, rounds)
            row.update(batch=video.shape[0], frames=video.shape[2], step_ms=statistics.median(times))
            if device == "cuda":
                row["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                row["top_kernels"] = _profile_step(model, video, ids, mask)
            del model, video, ids, mask
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc)[:160]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    ref = rows[list(MODEL_VARIANTS).index("reference")]
    for row in rows:
        if row is ref:
            continue
        if "step_ms" in row and "step_ms" in ref:
            row["speedup_vs_reference"] = ref["step_ms"] / row["step_ms"]
        if "peak_extra_gb" in row and "peak_extra_gb" in ref:
            row["memory_vs_reference"] = row["peak_extra_gb"] / ref["peak_extra_gb"]
    return rows
