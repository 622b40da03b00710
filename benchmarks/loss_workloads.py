"""Loss workloads shared by the CPU loss benchmarks, their memory probe and the GPU suite: `build_loss(spec)` returns
a no-argument callable running one forward + backward of `info_nce_loss`. A spec is a plain dict, so it crosses
process boundaries (the memory probe, benchmarks/_memory.py, runs it in a fresh interpreter).

Inputs: a, b `(N, D)` L2-normalised random features (as LF-VILA's projected, normalised v and p), temperature
0.05 (the official VPC value), symmetric loss; `backend="reference"` is the naive path that materialises the
N x N logits, the others the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_spec(n: int, d: int, backend: str, dtype: str = "float32", device: str = "cpu") -> dict:
    return {"op": "info_nce", "n": n, "d": d, "backend": backend, "dtype": dtype, "device": device}


def make_loss_inputs(n: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    return a, b


def build_loss(spec: dict):
    from lfvila_kernels import info_nce_loss

    a, b = make_loss_inputs(spec["n"], spec["d"], getattr(torch, spec["dtype"]), spec["device"])

    def run():
        loss = info_nce_loss(a, b, 0.05, backend=spec["backend"])
        loss.backward()
        a.grad = None
        b.grad = None
        return loss

    return run

