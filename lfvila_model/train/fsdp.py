"""`train.strategy: fsdp`: FSDP2 sharding of the model and its distributed checkpoints (docs/fsdp.md).

The `Trainer` calls this module at a few points; everything else of a step (task, losses, accumulation, clipping,
optimizer, schedule) is the same code as under DDP.

- `shard_model`: `fully_shard` on every transformer block (the video encoder's `SwinBlock3D`s, the text tower's
  `BertLayer`s: sentence, paragraph and cross-modal layers), then on the root for the rest (embeddings, patch
  merging, norms, projections, heads). Parameters become `DTensor` shards over a 1-D mesh of all ranks; a block's
  full weights exist only while it runs (all-gathered before its forward and again before its backward).
  Mixed precision is FSDP's `MixedPrecisionPolicy` (`precision_policy`), not autocast.
- `save_fsdp_checkpoint` / `load_fsdp_checkpoint`: the checkpoint layout of `checkpointing.py` (same directory
  names, `latest` pointer, temp dir + rename, RNG per rank, `trainer_state.pt`), with the model and optimizer
  tensors in `dcp/` written by `torch.distributed.checkpoint` through its safetensors storage
  (`HuggingFaceStorageWriter(save_distributed=True)`): each rank writes its own shards to
  `dcp/shard-<rank+1>-model-00001-of-00001.safetensors`, with the shards' offsets in the safetensors header, so the
  checkpoint loads on any world size and nothing in it is unpickled (DCP's default `.metadata` file is a pickle;
  this storage writes none). The non-tensor optimizer settings (param groups) go to `trainer_state.pt`, read with
  `torch.load(weights_only=True)` as under DDP.
- `gather_unsharded`: the full weights gathered on rank 0 into a plain copy of the model (evaluation, the best
  weights and the full-weights save at the end of a run, so `lfvila evaluate` / `load_pretrained` read an FSDP
  run like any other). `consolidate_fsdp_checkpoint` writes the same files for any other FSDP checkpoint, in one
  process.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..weights import atomic_write_bytes, save_pretrained
from .checkpointing import checkpoint_paths, prepare_checkpoint_dir, publish_checkpoint, rng_state, set_rng_state

__all__ = ["DCP_DIR", "precision_policy", "ensure_process_group", "shard_model", "transformer_blocks", "plain_class",
           "is_fsdp_checkpoint", "check_checkpoint_strategy", "gather_unsharded", "save_fsdp_checkpoint",
           "load_fsdp_checkpoint", "consolidate_fsdp_checkpoint", "grad_norm_value"]

DCP_DIR = "dcp"  # the DCP shards inside a checkpoint directory (its own folder: the reader scans every file in it)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_policy(precision: str):
    """`train.precision` as FSDP's `MixedPrecisionPolicy`: bf16/fp16 compute (parameters all-gathered in that
    dtype, forward inputs of each sharded module cast to it) with gradients reduced in fp32 and the sharded
    master weights and optimizer state kept in fp32; fp32: no casting."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    if precision not in _DTYPES:
        raise ValueError(f"train.precision must be one of ('fp32', 'bf16', 'fp16'), got {precision!r}")
    return MixedPrecisionPolicy(param_dtype=_DTYPES[precision], reduce_dtype=torch.float32)


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (`torchrun --nproc_per_node 1`, or resuming a sharded run
    alone): `init_distributed` makes none for one process, so a 1-rank group over an in-memory store is made
    here (`distributed.cleanup` destroys it with the rest)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def transformer_blocks(model: nn.Module) -> list:
    """The modules sharded one by one: every `SwinBlock3D` and every text `BertLayer`, in model order."""
    from transformers.models.bert.modeling_bert import BertLayer

    from ..video_encoder import SwinBlock3D

    return [m for m in model.modules() if isinstance(m, (SwinBlock3D, BertLayer))]


def _broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Every rank takes rank 0's weights, as DDP does at construction (ranks may draw different random inits),
    one tensor at a time through `device` (NCCL moves only device tensors)."""
    seen = set()
    with torch.no_grad():
        for t in model.state_dict().values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            buf = t.to(device)
            dist.broadcast(buf, 0)
            t.copy_(buf)


def shard_model(model: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Shard `model` in place over every rank: one FSDP unit per transformer block, then the root, with rank 0's
    initial weights. Pass the model on the CPU: `fully_shard` moves each unit to `device` as it shards it, so
    the device never holds more than one unit's full weights plus the shards. Build the optimizer after this
    (its parameters are the new `DTensor` shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):  # a second Trainer on the same model: sharded already
        return model
    ensure_process_group(device)
    if dist.get_world_size() > 1:
        _broadcast_from_rank0(model, device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = precision_policy(precision)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def plain_class(model: nn.Module) -> type:
    """The model's own class (`fully_shard` swaps in a subclass that also derives from `FSDPModule`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def grad_norm_value(norm) -> float:
    """`clip_grad_norm_`'s result as a float (a replicated `DTensor` over sharded gradients)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def is_fsdp_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def check_checkpoint_strategy(path: str, strategy: str) -> None:
    """Refuse to resume a checkpoint with the other strategy (their model / optimizer files differ)."""
    written = "fsdp" if is_fsdp_checkpoint(path) else "ddp"
    if written != strategy:
        raise ValueError(f"{path} was written with train.strategy={written}; resume it with train.strategy={written} "
                         f"(this run has train.strategy={strategy}). To start an FSDP run from DDP weights, pass "
                         f"them as model.init.checkpoint")


def _aliases(model: nn.Module) -> dict:
    """{second name: first name} of parameters registered under two names (the tied MLM bias): safetensors
    refuses tensors that share memory, so each is saved once."""
    first: dict = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _model_tensors(model: nn.Module) -> tuple:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    aliases = _aliases(model)
    sd = get_model_state_dict(model)
    return {k: v for k, v in sd.items() if k not in aliases}, aliases


def _optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def _split_optimizer(osd: dict) -> tuple:
    """(tensors keyed `optim.<param>.<name>`, everything else: param groups and non-tensor state entries)."""
    tensors, other = {}, {}
    for fqn, entries in osd["state"].items():
        for name, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"optim.{fqn}.{name}"] = v
            else:
                other.setdefault(fqn, {})[name] = v
    return tensors, {"param_groups": osd["param_groups"], "state": other}


def gather_unsharded(model: nn.Module, model_cls: type) -> Optional[nn.Module]:
    """A plain (unsharded) `model_cls` holding `model`'s full weights, on rank 0 (None elsewhere). Collective:
    every rank calls it. Built on the CPU (the torch RNG untouched) in the dtype of the model's parameters, filled,
    then moved to the model's device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..weights import load_checked

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):
        copy = model_cls(model.config)
    for name, mod in model.named_modules():  # run-time choices that are no config field (attention backend)
        if isinstance(getattr(mod, "backend", None), str):
            setattr(copy.get_submodule(name), "backend", mod.backend)
    param = next(model.parameters())
    copy.to(param.dtype)  # the model's own dtype (the sharded master weights: fp32 under bf16/fp16 policies too)
    load_checked(copy, full, strict=True)
    return copy.to(param.device)


def save_fsdp_checkpoint(ckpt_dir: str, step: int, model: nn.Module, optimizer, scheduler=None, scaler=None,
                         state: Optional[dict] = None, keep_last: int = 3, full_weights: Optional[type] = None,
                         barrier=None) -> str:
    """Write checkpoint `step` of a sharded model atomically (every rank calls it) and prune to the newest
    `keep_last`. `full_weights`: the model class; when given, the full weights are also gathered on rank 0 and
    written as `config.json` + `model.safetensors` (`save_pretrained`), as a DDP checkpoint holds them.
    Returns the final directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank, world = dist.get_rank(), dist.get_world_size()
    sync = barrier or dist.barrier
    name, final, tmp = checkpoint_paths(ckpt_dir, step)
    if rank == 0:
        prepare_checkpoint_dir(ckpt_dir, tmp)
        os.makedirs(os.path.join(tmp, DCP_DIR))
    sync()
    tensors, aliases = _model_tensors(model)
    tensors = {f"model.{k}": v for k, v in tensors.items()}
    opt_tensors, opt_rest = _split_optimizer(_optimizer_state(model, optimizer))
    tensors.update(opt_tensors)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, DCP_DIR), save_distributed=True))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    full = gather_unsharded(model, full_weights) if full_weights is not None else None
    if rank == 0:
        if full is not None:
            save_pretrained(full, tmp)
            del full
        else:  # the config alone: consolidate_fsdp_checkpoint rebuilds the model from it
            atomic_write_bytes(os.path.join(tmp, "config.json"),
                               (json.dumps(model.config.to_dict(), indent=2) + "\n").encode())
        trainer = {"step": int(step), "world_size": int(world), "strategy": "fsdp", "state": dict(state or {}),
                   "optimizer": opt_rest, "aliases": aliases}
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


def load_fsdp_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                         restore_rng: bool = True) -> dict:
    """Load a checkpoint of `save_fsdp_checkpoint` into a sharded model and its optimizer, on any world size (DCP
    reads each rank's part of every tensor from whichever files hold it). Returns the trainer state dict
    (`step`, `state`, ...). The RNG state of this rank (or rank 0's if the world size changed) is restored."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not os.path.isfile(os.path.join(path, "trainer_state.pt")) or not is_fsdp_checkpoint(path):
        raise FileNotFoundError(f"{path} is not an FSDP training checkpoint (no trainer_state.pt and {DCP_DIR}/)")
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    reader = HuggingFaceStorageReader(os.path.join(path, DCP_DIR))
    saved = set(reader.read_metadata().state_dict_metadata)
    tensors, aliases = _model_tensors(model)
    targets = {f"model.{k}": v for k, v in tensors.items()}
    missing = sorted(k[len("model."):] for k in targets if k not in saved)
    unexpected = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k not in targets)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    osd = None
    if optimizer is not None:
        if "optimizer" not in trainer:
            raise ValueError(f"{path} holds no optimizer state")
        osd = _optimizer_state(model, optimizer)  # fresh state tensors of the right shards to read into
        # parameters that never had a gradient (unused heads) have no saved state: they keep none
        osd["state"] = {fqn: entries for fqn, entries in osd["state"].items()
                        if any(k.startswith(f"optim.{fqn}.") for k in saved)}
        opt_tensors, _ = _split_optimizer(osd)
        targets.update(opt_tensors)
    dcp.load(targets, storage_reader=reader)
    sd = {k[len("model."):]: v for k, v in targets.items() if k.startswith("model.")}
    sd.update({alias: sd[first] for alias, first in aliases.items()})
    set_model_state_dict(model, sd)
    if optimizer is not None:
        rest = trainer["optimizer"]
        for fqn, entries in rest.get("state", {}).items():
            osd["state"].setdefault(fqn, {}).update(entries)
        osd["param_groups"] = rest["param_groups"]
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(strict=False))
    if scheduler is not None and "scheduler" in trainer:
        scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and "scaler" in trainer:
        scaler.load_state_dict(trainer["scaler"])
    if restore_rng:
        f = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
        if not os.path.isfile(f):
            f = os.path.join(path, "rng_rank0.pt")
        set_rng_state(torch.load(f, map_location="cpu", weights_only=True))
    return trainer


def consolidate_fsdp_checkpoint(path: str, out: Optional[str] = None) -> str:
    """Write the full weights of FSDP checkpoint `path` as `config.json` + `model.safetensors` (the
    `save_pretrained` format that `lfvila evaluate` and `load_pretrained` read) into `out` (default: `path`
    itself). Runs in one process, with or without a process group: DCP reads every shard here. Returns `out`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ..factory import build_model
    from ..weights import load_checked, read_pretrained_config

    if not is_fsdp_checkpoint(path):
        raise FileNotFoundError(f"{path} is not an FSDP training checkpoint (no {DCP_DIR}/)")
    out = out or path
    meta = HuggingFaceStorageReader(os.path.join(path, DCP_DIR)).read_metadata().state_dict_metadata
    targets = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
    with warnings.catch_warnings():  # reading in one process is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(os.path.join(path, DCP_DIR)), no_dist=True)
    sd = {k[len("model."):]: v for k, v in targets.items()}
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    sd.update({alias: sd[first] for alias, first in trainer.get("aliases", {}).items()})
    with torch.random.fork_rng(devices=[]):
        model = build_model(read_pretrained_config(path))
    model.to(next(v.dtype for v in sd.values() if v.is_floating_point()))
    load_checked(model, sd, strict=True)
    save_pretrained(model, out)
    return out
