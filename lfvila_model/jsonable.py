"""Plain-JSON values for the metric and run files."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["jsonable"]


def jsonable(x: Any) -> Any:
    """`x` with numpy / torch values as plain Python (non-finite floats as None), for `json.dump`."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    return x
