"""Loads the compiled extension `lfvila_kernels._C` (registers the `lfvila_C::` ops) and reports what it has."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the extension loaded, else why it did not."""
    try:
        from . import _C  # noqa: F401
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
