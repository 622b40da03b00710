"""Plain-JSON values for the metric and run files, and the atomic writer of the JSON report files."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

__all__ = ["jsonable", "write_json"]


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON with a final newline, atomically (a temporary file, then a rename), so a
    reader never sees half a report."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
