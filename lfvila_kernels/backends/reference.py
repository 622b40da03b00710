"""The reference backend ("reference"): the oracle every other backend is tested against. Its code stays in
`lfvila_kernels/reference.py` (the tests import it from there); this module gives it the backend's shape: a
predicate and the entry points."""

from __future__ import annotations

import torch

from ..reference import htwa_reference, info_nce_reference, temporal_contrastive_reference

__all__ = ["can_run_reference", "htwa_reference", "info_nce_reference", "temporal_contrastive_reference"]


def can_run_reference(device: torch.device, dtype: torch.dtype, raise_error: bool = False) -> bool:
    """Plain PyTorch with autograd: runs wherever torch does."""
    return True
