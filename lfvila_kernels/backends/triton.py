"""The Triton backend ("triton"): its predicate and entry points. The kernels and their launchers live in
`lfvila_kernels/triton/` (HTWA: htwa_fwd.py, htwa_bwd.py, htwa_dbias.py, launched by htwa_launch.py; InfoNCE:
info_nce.py) and are imported on first use, so that importing lfvila_kernels never imports triton."""

from __future__ import annotations

import functools

import torch

from ._common import fail, triton_interpreted

__all__ = ["triton_available", "triton_interpreted", "can_run_triton", "htwa_fwd", "htwa_bwd", "info_nce_fwd",
           "info_nce_bwd"]


@functools.lru_cache(maxsize=None)
def triton_available() -> str | None:
    """None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def can_run_triton(device: torch.device, dtype: torch.dtype, raise_error: bool = False) -> bool:
    err = triton_available()
    if err is not None:
        return fail(raise_error, "triton", err)
    if device.type == "cpu" and not triton_interpreted():
        return fail(raise_error, "triton", "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                    "before importing triton)")
    if device.type not in ("cpu", "cuda"):
        return fail(raise_error, "triton", f"unsupported device {device}")
    if dtype == torch.float64 and device.type == "cuda":
        return fail(raise_error, "triton", "float64 is not supported on the GPU; use backend='reference'")
    return True


def htwa_fwd(q, k, v, bias, window, shift, bias_window, scale):
    """HTWA forward (contract: csrc/HTWA_CONTRACT.md). Returns (out, lse)."""
    from ..triton.htwa_launch import htwa_fwd_triton

    return htwa_fwd_triton(q, k, v, bias, window, shift, bias_window, scale)


def htwa_bwd(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dqkv=None):
    """HTWA backward (contract: csrc/HTWA_CONTRACT.md). Returns (dq, dk, dv, dbias); with `dqkv` (a
    (B, T, H, W, 3, heads, D) tensor) dq, dk, dv are written into its slices."""
    from ..triton.htwa_launch import htwa_bwd_triton

    return htwa_bwd_triton(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dqkv=dqkv)


def info_nce_fwd(a, b, temperature, offset, symmetric):
    """InfoNCE forward (contract: lfvila_kernels/losses.py). Returns (loss, lse_row, lse_col)."""
    from ..triton.info_nce import info_nce_fwd_triton

    return info_nce_fwd_triton(a, b, temperature, offset, symmetric)


def info_nce_bwd(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric):
    """InfoNCE backward (contract: lfvila_kernels/losses.py). Returns (da, db)."""
    from ..triton.info_nce import info_nce_bwd_triton

    return info_nce_bwd_triton(dloss, a, b, temperature, lse_row, lse_col, offset, symmetric)
