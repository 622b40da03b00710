"""The backend registry of the public ops: which backends exist, and the choice among them (`resolve`). The
`can_run_<backend>(..., raise_error)` predicates live in the backend modules (lfvila_kernels/backends/).

`auto` tries the backends of the device in order and falls through (logging why, once) to the next; an
explicitly requested backend that cannot run raises with the reason.
"""

from __future__ import annotations

import logging

import torch

from .backends.cpp import can_run_compiled
from .backends.triton import can_run_triton

log = logging.getLogger("lfvila_kernels")

HTWA_BACKENDS = ("auto", "cpp", "cuda", "triton", "flex", "sdpa", "reference")


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
