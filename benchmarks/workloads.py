"""Workload factory shared by the timing benchmarks and the memory probe: `build(spec)` returns a no-argument
callable that runs one forward (and backward) pass. A spec is a plain dict so it crosses process boundaries."""

from __future__ import annotations

import torch

from lfvila_kernels import htwa_attention_qkv
from lfvila_kernels.shapes import (HEAD_DIM, OFFICIAL_GRIDS, OFFICIAL_HEADS, OFFICIAL_WINDOWS, make_htwa_inputs,
                                   official_cases)


def htwa_spec(case_name: str, backend: str, mode: str, batch: int, dtype: str = "float32") -> dict:
    return {"op": "htwa", "case": case_name, "backend": backend, "mode": mode, "batch": batch, "dtype": dtype}


def _build_htwa(spec):
    case = next(c for c in official_cases() if c.name == spec["case"])
    dtype = getattr(torch, spec["dtype"])
    train = spec["mode"] == "fwd+bwd"
    qkv, (q, k, v), bias = make_htwa_inputs(case, spec["batch"], dtype, requires_grad=train)
    dout = torch.randn(q.shape, dtype=dtype) if train else None

    def run():
        with torch.set_grad_enabled(train):
            # the packed entry point, as the model calls it (reference/sdpa/flex take q, k, v = qkv.unbind(4))
            out = htwa_attention_qkv(qkv, bias, window=case.window, shift=case.shift,
                                     bias_window=case.bias_window, backend=spec["backend"])
            if train:
                out.backward(dout)
                qkv.grad = None
                bias.grad = None
        return out

    return run


# The model benchmarks' variants (CPU: test_bench_model.py, GPU: gpu_model.py): name -> (attention backend,
# fused blocks). "reference" is the official computation; "auto-plain-blocks" is the fused attention alone.
MODEL_VARIANTS = {"reference": ("reference", False), "auto": ("auto", True), "auto-plain-blocks": ("auto", False)}


def model_spec(backend: str, frames: int, fused_blocks: bool | None = None) -> dict:
    """backend "reference" alone = the official computation: reference attention and the plain block modules
    (`fused_blocks` sets both the video blocks' and the BERT layers' fused feed-forward, `text.fused_ffn`)."""
    fused = backend != "reference" if fused_blocks is None else fused_blocks
    return {"op": "model_stage1", "backend": backend, "frames": frames, "fused_blocks": fused}


def setup_model_stage1(backend: str, frames: int, fused_blocks: bool = True):
    """`lfvila-official` stage 1 (train mode, random init) with the given attention backend and block modules, and
    one batch-1 input at `frames` frames (with fewer than 32 the late layers' temporal windows are clipped to the
    grid, spec 1.3)."""
    from lfvila_model import create_model

    torch.manual_seed(0)
    video_cfg = {"num_frames": frames, "attention_backend": backend, "fused_blocks": fused_blocks}
    model = create_model("lfvila-official", video=video_cfg, text={"fused_ffn": fused_blocks}).train()
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, frames, 192, 320, generator=g)
    ids = torch.randint(1000, 20000, (1, 4, 50), generator=g)
    return model, video, ids, torch.ones_like(ids)


def _build_model_stage1(spec):
    model, video, ids, mask = setup_model_stage1(spec["backend"], spec["frames"], spec.get("fused_blocks", True))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(video, ids, mask, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        return loss

    return run


BLOCK_LAYERS = (0, 2)  # the official layers the block benchmark times: the largest grid, the deepest layer


def block_layer_shape(layer: int):
    """(grid, dim, heads, window, depth) of an official layer at 32 frames (lfvila_kernels.shapes, the preset)."""
    from lfvila_model.config import VideoEncoderConfig

    heads = OFFICIAL_HEADS[layer]
    return OFFICIAL_GRIDS[layer], heads * HEAD_DIM, heads, OFFICIAL_WINDOWS[layer], VideoEncoderConfig().depths[layer]


def block_spec(layer: int, variant: str) -> dict:
    """variant "reference": the plain nn modules (the official blocks); "fused": the fused block Functions."""
    return {"op": "swin_layer", "layer": layer, "backend": variant}


def _build_layer(spec):
    from lfvila_model.video_encoder import SwinBlock3D

    grid, dim, heads, window, depth = block_layer_shape(spec["layer"])
    torch.manual_seed(0)
    # the attention is the C++ kernel on both sides: only the blocks' LayerNorm / Linear / GELU modules differ
    blocks = torch.nn.Sequential(*(
        SwinBlock3D(dim, heads, window, j % 2 == 1, 4.0, True, 0.0, 0.0, "cpp", "pad",
                    fused=spec["backend"] == "fused")
        for j in range(depth)
    )).train()
    x = torch.randn(1, *grid, dim, requires_grad=True)
    dout = torch.randn(1, *grid, dim)

    def run():
        out = blocks(x)
        out.backward(dout)
        x.grad = None
        blocks.zero_grad(set_to_none=True)
        return out

    return run


def build(spec: dict):
    if spec["op"] == "htwa":
        return _build_htwa(spec)
    if spec["op"] == "info_nce":
        from benchmarks.loss_workloads import build_loss

        return build_loss(spec)
    if spec["op"] == "model_stage1":
        return _build_model_stage1(spec)
    if spec["op"] == "swin_layer":
        return _build_layer(spec)
    raise ValueError(f"unknown workload op {spec['op']!r}")
