"""The compiled backends ("cpp" on the CPU, "cuda" on the GPU): loads the extension `lfvila_kernels._C` (it
registers the `lfvila_C::` ops), reports what it has (`can_run_compiled`), and hands out its entry points
(`ops()`: `htwa_fwd`, `htwa_bwd`, `htwa_bwd_packed`, `info_nce_fwd`, `info_nce_bwd`; contracts in
csrc/HTWA_CONTRACT.md and lfvila_kernels/losses.py)."""

from __future__ import annotations

import functools

import torch

from ._common import fail


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the extension loaded, else why it did not."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as exc:  # not built (e.g. a source checkout without `pip install .`)
        return f"the compiled extension lfvila_kernels._C is not available ({exc}); build it with `pip install .`"
    return None


def dispatch_has_kernel(qualname: str, device_type: str) -> bool:
    """True when the dispatcher has a kernel of the op overload `qualname` (e.g. "aten::mm.dtype") for the
    device type ('cpu', 'cuda', ...): what a call on that device would find, asked without making the call."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, device_type.upper())


@torch.compiler.assume_constant_result  # a dispatcher query dynamo cannot trace; constant for a process
def has_kernel(op: str, device: str) -> bool:
    """True when the compiled op `lfvila_C::<op>` has a kernel for `device` ('cpu' or 'cuda')."""
    if load_error() is not None:
        return False
    return dispatch_has_kernel(f"lfvila_C::{op}", device)


def ops():
    """`torch.ops.lfvila_C` with the extension loaded: the compiled ops may be called directly (opcheck, the
    custom ops' implementations) without going through a public function's backend check first."""
    err = load_error()
    if err is not None:
        raise RuntimeError(f"the compiled backends cannot run: {err}")
    return torch.ops.lfvila_C


def can_run_compiled(op: str, backend: str, device: torch.device, raise_error: bool = False) -> bool:
    """Whether `backend` ("cpp": CPU tensors, "cuda": CUDA tensors) has a compiled kernel for `op` on `device`."""
    want = "cpu" if backend == "cpp" else "cuda"
    if device.type != want:
        return fail(raise_error, backend, f"it runs on {want} tensors, got {device.type} tensors")
    if load_error() is not None:
        return fail(raise_error, backend, load_error())
    if not has_kernel(op, want):
        return fail(raise_error, backend, f"lfvila_kernels._C was built without a {want} kernel for {op}")
    return True


def can_run_cpp(op: str, device: torch.device, raise_error: bool = False) -> bool:
    return can_run_compiled(op, "cpp", device, raise_error)


def can_run_cuda(op: str, device: torch.device, raise_error: bool = False) -> bool:
    return can_run_compiled(op, "cuda", device, raise_error)
