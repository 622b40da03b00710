"""What every backend module shares: the accumulation dtype, whether Triton runs interpreted, and the failure path
of the `can_run_*` predicates. Imports nothing of lfvila_kernels (the Triton kernel modules import it too)."""

from __future__ import annotations

import os

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every backend: fp64 for fp64 inputs, fp32 for the rest (fp32, fp16, bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fail(raise_error: bool, backend: str, why: str) -> bool:
    """A predicate's "no": raise with the reason when asked to, else return False."""
    if raise_error:
        raise RuntimeError(f"backend={backend!r} cannot run: {why}")
    return False
