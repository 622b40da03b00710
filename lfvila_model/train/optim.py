"""Optimizer and learning-rate schedules of LF-VILA training (spec 4.1, 4.2).

- `param_groups`: the official weight-decay split (`src/optimization/optimizer.py`): no decay for parameters whose
  name contains `bias`, `LayerNorm.bias`, `LayerNorm.weight`, `pos_embed` or `relative_position_bias_table`;
  decay for everything else (so Swin's `norm1`/`norm2` weights *are* decayed, as released). Parameters whose name
  contains `pooler` are left out of the optimizer (spec 4.1 quirk, decision 7.6); `include_pooler=True` adds them.
  Frozen parameters (`requires_grad=False`) are never included.
- `build_optimizer`: AdamW, betas (0.9, 0.98), eps 1e-8, weight decay 0.05, lr 5e-5 by default.
- `LRSchedule` / `Scheduler`: per-iteration multipliers of each group's base lr:
  `linear` (warm-up from 0, then linear decay to `lr_min_rate` x base; official `LinearLRScheduler`),
  `step` (warm-up, then x `gamma` every `step_size` iterations; retrieval fine-tuning),
  `cosine` (warm-up, then half-cosine down to the absolute `min_lr`; ActivityNet-QA), `constant`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["NO_DECAY_KEYS", "param_groups", "build_optimizer", "LRSchedule", "Scheduler", "SCHEDULES"]

NO_DECAY_KEYS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "pos_embed", "relative_position_bias_table")
SCHEDULES = ("linear", "step", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float = 0.05, include_pooler: bool = False,
                 lr_scale: Optional[Mapping[str, float]] = None, base_lr: Optional[float] = None) -> list:
    """Named parameter groups for AdamW.

    Args:
        model: the model (a DDP wrapper is unwrapped, so names match the official ones).
        weight_decay: decay of the decayed group.
        include_pooler: also optimise parameters named `*pooler*` (released code: never).
        lr_scale: optional `{name prefix: factor}`; a parameter takes the factor of its longest matching prefix
            (an lr multiplier per part; not used by the official configs).
        base_lr: the lr the factors multiply (required with `lr_scale`).
    Returns:
        list of dicts `{"params", "names", "weight_decay"[, "lr"]}`, one per (decay, lr factor) pair; empty
        groups are dropped.
    """
    model = getattr(model, "module", model)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    lr_scale = dict(lr_scale or {})
    if lr_scale and base_lr is None:
        raise ValueError("lr_scale needs base_lr")
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "pooler" in name and not include_pooler:
            continue
        decay = not any(k in name for k in NO_DECAY_KEYS)
        prefixes = [k for k in lr_scale if name.startswith(k)]
        factor = lr_scale[max(prefixes, key=len)] if prefixes else 1.0
        g = groups.setdefault((decay, factor), {"params": [], "names": [],
                                                "weight_decay": weight_decay if decay else 0.0})
        if factor != 1.0:
            g["lr"] = base_lr * factor
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def build_optimizer(model: nn.Module, lr: float = 5e-5, weight_decay: float = 0.05, betas=(0.9, 0.98),
                    eps: float = 1e-8, include_pooler: bool = False,
                    lr_scale: Optional[Mapping[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` (official hyper-parameters by default)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    groups = param_groups(model, weight_decay, include_pooler, lr_scale, lr)
    if not groups:
        raise ValueError("the model has no trainable parameters for the optimizer")
    for g in groups:
        del g["names"]  # param_groups() keeps them for inspection; the optimizer state stays plain
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


@dataclass
class LRSchedule:
    """Multiplier of the base lr at iteration `step` (0-based: the lr used by the step-th update).

    Args:
        kind: "linear", "step", "cosine" or "constant".
        total_steps: iterations of the whole run (linear/cosine decay end).
        warmup_steps: linear warm-up from 0: multiplier `step / warmup_steps` for `step < warmup_steps`.
        lr_min_rate: linear: the multiplier reached at `total_steps` (0.01 officially).
        step_size, gamma: step: multiplier `gamma ** (step // step_size)` after warm-up.
        min_lr, base_lr: cosine: decays to the absolute `min_lr` (1e-8 officially); needs `base_lr`.
    """

    kind: str = "linear"
    total_steps: int = 1
    warmup_steps: int = 0
    lr_min_rate: float = 0.01
    step_size: int = 1
    gamma: float = 0.1
    min_lr: float = 0.0
    base_lr: float = 1.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        for name in ("total_steps", "step_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.lr_min_rate <= 1.0:
            raise ValueError(f"lr_min_rate must be in [0, 1], got {self.lr_min_rate}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (step // self.step_size)
        span = max(self.total_steps - self.warmup_steps, 1)
        frac = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.lr_min_rate) * frac
        floor = self.min_lr / self.base_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class Scheduler:
    """Sets every param group's lr to `initial_lr x schedule(step)`; `step()` after each optimizer update.
    Its state (`state_dict`) is the iteration count, so a resumed run continues the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule):
        self.optimizer = optimizer
        self.schedule = schedule
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        m = self.schedule(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * m

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()

