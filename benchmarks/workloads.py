"""Workload factory shared by the timing benchmarks and the memory probe: `build(spec)` returns a no-argument
callable that runs one forward (and backward) pass. A spec is a plain dict so it crosses process boundaries."""

from __future__ import annotations

import torch

from lfvila_kernels import htwa_attention
from lfvila_kernels.shapes import official_cases, make_htwa_inputs


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
            out = htwa_attention(q, k, v, bias, window=case.window, shift=case.shift, bias_window=case.bias_window,
                                 backend=spec["backend"])
            if train:
                out.backward(dout)
                qkv.grad = None
                bias.grad = None
        return out

    return run


def build(spec: dict):
    if spec["op"] == "htwa":
        return _build_htwa(spec)
    raise ValueError(f"unknown workload op {spec['op']!r}")
