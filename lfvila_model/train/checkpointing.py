"""Training checkpoints: written atomically, read without unpickling objects, the last N kept.

A checkpoint is a directory `<out>/checkpoints/step-<step:08d>/`:

    config.json, model.safetensors   the model (`lfvila_model.weights.save_pretrained`: own format)
    trainer_state.pt                 optimizer, scheduler, grad scaler, step/epoch/batch counters, metadata;
                                     plain tensors, numbers, strings, lists and dicts only
    rng_rank<r>.pt                   RNG states of rank r: torch CPU (+ CUDA), numpy, python `random`

Atomicity: everything is written into a hidden temp directory `.step-<step>.tmp`, then renamed into place with
`os.replace` (a directory rename is atomic on POSIX), and only then is the `latest` pointer file replaced. A
crash mid-write leaves the previous checkpoint and pointer untouched; stale temp directories are removed by the
next save. Loading uses `torch.load(weights_only=True)` and safetensors, so a checkpoint can never run code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..weights import atomic_write_bytes, load_checked, read_state_dict, save_pretrained

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints", "checkpoint_paths", "prepare_checkpoint_dir", "publish_checkpoint"]

_NAME = re.compile(r"^step-(\d{8,})$")
LATEST = "latest"


def rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors and plain Python values."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, pygauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss), "kind": mt},
        "python": {"version": version, "state": list(pystate), "gauss": pygauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def list_checkpoints(ckpt_dir: str) -> list:
    """Complete checkpoints under `ckpt_dir`, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for d in os.listdir(ckpt_dir):
        m = _NAME.match(d)
        if m and os.path.isfile(os.path.join(ckpt_dir, d, "trainer_state.pt")):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, d)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The checkpoint the `latest` pointer names (else the newest complete one), or None."""
    ptr = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(ptr):
        with open(ptr) as f:
            name = f.read().strip()
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(os.path.join(path, "trainer_state.pt")):
            return path
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def checkpoint_paths(ckpt_dir: str, step: int) -> tuple[str, str, str]:
    """`(name, final, tmp)` of checkpoint `step`: a checkpoint is written into `tmp` and renamed to `final`."""
    name = f"step-{step:08d}"
    return name, os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, f".{name}.tmp")


def prepare_checkpoint_dir(ckpt_dir: str, tmp: str) -> None:
    """Rank 0, before a save: the checkpoint folder exists, leftovers of an interrupted save are gone, `tmp` is
    new and empty."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for d in os.listdir(ckpt_dir):  # leftovers of an interrupted save
        if d.startswith(".step-") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    os.makedirs(tmp)


def publish_checkpoint(ckpt_dir: str, name: str, tmp: str, final: str, keep_last: Optional[int]) -> None:
    """Rank 0, after every rank has written into `tmp`: rename it to `final` (atomic), point `latest` at it, and
    prune to the newest `keep_last` (0 or None keeps all)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(os.path.join(ckpt_dir, LATEST), (name + "\n").encode())
    if keep_last:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    state: Optional[dict] = None, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                    barrier=None) -> str:
    """Write checkpoint `step` atomically and prune to the newest `keep_last` (0 or None keeps all).

    With several ranks every rank calls this: each writes its RNG state, rank 0 the rest, and `barrier` (a
    callable) orders the steps; the rename happens on rank 0 after every rank has written.
    Returns the final directory.
    """
    name, final, tmp = checkpoint_paths(ckpt_dir, step)
    sync = barrier or (lambda: None)
    if rank == 0:
        prepare_checkpoint_dir(ckpt_dir, tmp)
    sync()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        save_pretrained(_unwrap(model), tmp)
        trainer = {"step": int(step), "world_size": int(world_size), "state": dict(state or {})}
        if optimizer is not None:
            trainer["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            trainer["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            trainer["scaler"] = scaler.state_dict()
        torch.save(trainer, os.path.join(tmp, "trainer_state.pt"))
    sync()
    if rank == 0:
        publish_checkpoint(ckpt_dir, name, tmp, final, keep_last)
    sync()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, scaler=None, rank: int = 0,
                    restore_rng: bool = True, strict: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` into the given objects; returns the trainer state dict
    (`step`, `state`, ...). The RNG state of this rank (or rank 0's if the world size changed) is restored."""
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.pt)")
    load_checked(_unwrap(model), read_state_dict(os.path.join(path, "model.safetensors")), strict=strict)
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    if optimizer is not None:
        if "optimizer" not in trainer:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and "scheduler" in trainer:
        scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and "scaler" in trainer:
        scaler.load_state_dict(trainer["scaler"])
    if restore_rng:
        f = os.path.join(path, f"rng_rank{rank}.pt")
        if not os.path.isfile(f):
            f = os.path.join(path, "rng_rank0.pt")
        set_rng_state(torch.load(f, map_location="cpu", weights_only=True))
    return trainer
