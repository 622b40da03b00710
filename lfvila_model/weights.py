"""Reading and writing LF-VILA weights.

- `read_state_dict(path)`: `.safetensors` (safetensors) or `.bin`/`.pth`/`.pt` (`torch.load(weights_only=True)`:
  never unpickles arbitrary objects); a Hugging Face directory reads its `model.safetensors` or `pytorch_model.bin`.
- `load_checked(module, state_dict, strict)`: the one loader. Shape mismatches are refused with the names listed;
  missing / unexpected keys are refused when strict; with `strict=False` the fitting tensors load and the rest is
  reported (`LoadReport`). Derived buffers (`relative_position_index`, `position_ids`) are recomputed, not read.
- `save_pretrained(model, dir)` / `read_pretrained_config(dir)` + `load_pretrained_weights(model, dir)` (the
  factory's `load_pretrained(dir)` joins them): own format, `config.json` + `model.safetensors`, written
  atomically (temp file, then `os.replace`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

__all__ = ["LoadReport", "group_names", "read_state_dict", "load_checked", "save_pretrained",
           "read_pretrained_config", "load_pretrained_weights"]

logger = logging.getLogger("lfvila_model")

DERIVED_BUFFERS = ("relative_position_index", "position_ids")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadReport:
    """What a load did. `mismatched` holds (name, checkpoint shape, model shape)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    loaded: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.missing:
            parts.append(f"missing ({len(self.missing)}): {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected ({len(self.unexpected)}): {self.unexpected}")
        if self.mismatched:
            parts.append("shape mismatch: " + ", ".join(f"{n} checkpoint {a} vs model {b}" for n, a, b in self.mismatched))
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for the console: counts, and the missing / unexpected names as groups (`group_names`)."""
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} new: {group_names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused: {group_names(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} mis-shaped: {group_names([n for n, _, _ in self.mismatched])}")
        return "; ".join(parts)


def group_names(names: List[str]) -> str:
    """Tensor names grouped by module: `text_encoder.layer.6.x`..`text_encoder.layer.11.y` -> `text_encoder.layer
    6-11`; names without a layer index by their first two parts (`mlm_head.dense`)."""
    groups: Dict[str, set] = {}
    for name in names:
        parts = name.split(".")
        num = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if num is None:
            groups.setdefault(".".join(parts[:2]), set())
        else:
            groups.setdefault(".".join(parts[:num]), set()).add(int(parts[num]))
    out = []
    for prefix, idx in groups.items():
        if not idx:
            out.append(prefix)
            continue
        ranges, ordered = [], sorted(idx)
        lo = prev = ordered[0]
        for i in ordered[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            ranges.append(str(lo) if lo == prev else f"{lo}-{prev}")
            if i is not None:
                lo = prev = i
        out.append(f"{prefix} {','.join(ranges)}")
    return ", ".join(out)


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """Tensors of a checkpoint file or Hugging Face directory, on the CPU, without unpickling objects."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} does not hold a dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def _is_derived(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                 ignore_missing: Tuple[str, ...] = (), log: bool = True) -> LoadReport:
    """Load `state_dict` into `module`, refusing silent partial loads.

    Args:
        strict: True: any missing, unexpected or mis-shaped tensor raises ValueError naming them (nothing is
            loaded). False: tensors that fit are loaded; the rest is reported (and logged).
        ignore_missing: name prefixes allowed to be absent even when strict (e.g. derived buffers).
        log: log a warning with the report after a partial load.
    Returns:
        `LoadReport`.
    """
    own = module.state_dict()
    report = LoadReport()
    to_load = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        elif not _is_derived(k):
            to_load[k] = v
    report.missing = [k for k in own if k not in state_dict and not _is_derived(k)
                      and not k.startswith(tuple(ignore_missing))]
    if report.mismatched:
        names = [n for n, _, _ in report.mismatched]
        if strict:
            raise ValueError(f"checkpoint shapes do not fit the model config; refused: {report}. "
                             f"Pass strict=False to load the rest ({len(names)} skipped)")
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint keys do not match the model: {report}. Pass strict=False for a partial load")
    with torch.no_grad():
        for k, v in to_load.items():
            own[k].copy_(v)  # state_dict() tensors share storage with the parameters
    report.loaded = len(to_load)
    if log and not report.clean:
        logger.warning("partial load: %s", report)
    return report


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model: nn.Module, directory: str) -> None:
    """Write `config.json` (the model's `LFVILAConfig`) and `model.safetensors` (its full state dict; tensors that
    share storage, e.g. the tied MLM bias, are stored once per name as copies). Each file is written to a temp
    name and moved into place."""
    from safetensors.torch import save

    os.makedirs(directory, exist_ok=True)
    seen = set()
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        if ptr in seen or not v.is_contiguous():
            v = v.contiguous().clone()
        seen.add(ptr)
        tensors[k] = v
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME),
                        save(tensors, metadata={"format": "pt", "lfvila_model_type": model.config.model_type}))
    text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), text.encode())


def read_pretrained_config(directory: str, **config_changes):
    """The `LFVILAConfig` in `directory/config.json` (as written by `save_pretrained`), with `config_changes`."""
    from .config import LFVILAConfig

    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; save_pretrained writes one")
    cfg = LFVILAConfig.load(cfg_path)
    return cfg.replace(**config_changes) if config_changes else cfg


def load_pretrained_weights(model: nn.Module, directory: str, strict: bool = True) -> LoadReport:
    """Load `directory/model.safetensors` into `model` (checked as `load_checked`)."""
    return load_checked(model, read_state_dict(os.path.join(directory, WEIGHTS_NAME)), strict=strict)
