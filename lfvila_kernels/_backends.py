"""Per-backend `can_run_<backend>(..., raise_error)` predicates and the `auto` choice.

`auto` tries the backends of the device in order and falls through (logging why, once) to the next; an
explicitly requested backend that cannot run raises with the reason.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import _ext

log = logging.getLogger("lfvila_kernels")

HTWA_BACKENDS = ("auto", "cpp", "cuda", "triton", "flex", "sdpa", "reference")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every backend: fp64 for fp64 inputs, fp32 for the rest (fp32, fp16, bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(raise_error: bool, backend: str, why: str) -> bool:
    if raise_error:
        raise RuntimeError(f"backend={backend!r} cannot run: {why}")
    return False


@functools.lru_cache(maxsize=None)
def triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_compiled(op: str, backend: str, device: torch.device, raise_error: bool = False) -> bool:
    want = "cpu" if backend == "cpp" else "cuda"
    if device.type != want:
        return _fail(raise_error, backend, f"it runs on {want} tensors, got {device.type} tensors")
    if _ext.load_error() is not None:
        return _fail(raise_error, backend, _ext.load_error())
    if not _ext.has_kernel(op, want):
        return _fail(raise_error, backend, f"lfvila_kernels._C was built without a {want} kernel for {op}")
    return True


def can_run_triton(device: torch.device, dtype: torch.dtype, raise_error: bool = False) -> bool:
    err = triton_available()
    if err is not None:
        return _fail(raise_error, "triton", err)
    if device.type == "cpu" and not triton_interpreted():
        return _fail(raise_error, "triton", "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                     "before importing triton)")
    if device.type not in ("cpu", "cuda"):
        return _fail(raise_error, "triton", f"unsupported device {device}")
    if dtype == torch.float64 and device.type == "cuda":
        return _fail(raise_error, "triton", "float64 is not supported on the GPU; use backend='reference'")
    return True


_warned: set = set()


def _note_fallthrough(backend: str, why: str) -> None:
    if backend not in _warned and not torch.compiler.is_compiling():
        _warned.add(backend)
        log.warning("lfvila_kernels: backend %r skipped in auto mode: %s", backend, why)


def choose(op: str, candidates_cpu, candidates_cuda, device: torch.device, dtype: torch.dtype) -> str:
    """The first backend of the device's list that can run; 'reference' as the last resort."""
    order = candidates_cuda if device.type == "cuda" else candidates_cpu
    for backend in order:
        try:
            if backend in ("cpp", "cuda"):
                can_run_compiled(op, backend, device, raise_error=True)
            elif backend == "triton":
                can_run_triton(device, dtype, raise_error=True)
            return backend
        except RuntimeError as exc:
            _note_fallthrough(backend, str(exc))
    return "reference"


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: str, dtype: torch.dtype, cpu_order: tuple, cuda_order: tuple) -> str:
    """The backend to run for `op`: with "auto" the device's first that can run (else 'reference'); an explicit
    compiled or Triton backend that cannot run raises with the reason. The result depends only on constant
    arguments, so torch.compile evaluates it once at trace time (the predicates query the dispatcher, which Dynamo
    cannot trace)."""
    device = torch.device(device)
    if backend == "auto":
        return choose(op, cpu_order, cuda_order, device, dtype)
    if backend in ("cpp", "cuda"):
        can_run_compiled(op, backend, device, raise_error=True)
    elif backend == "triton":
        can_run_triton(device, dtype, raise_error=True)
    return backend
