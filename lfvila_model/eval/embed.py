"""Embedding your own videos: files -> sampled frames -> features -> an index on disk (`lfvila embed`).

Frames are sampled exactly as the retrieval evaluation samples them (`RetrievalDataset` with ``train=False``):
:func:`~lfvila_model.data.video.downstream_indices` (F frames evenly over the whole video) and
:func:`~lfvila_model.data.video.eval_transform` (Resize -> CenterCrop -> Resize to the model's input size), so
the features are those the evaluation scores (the encoding itself: `eval/encode.py`). Decoding runs in
DataLoader worker processes; a file that cannot be decoded is skipped and reported with its reason, never fatal.

The index is two files beside each other:

- ``PREFIX.safetensors``: ``features``, float32 ``(N, E)``, L2-normalised rows;
- ``PREFIX.json``: ``ids`` (N paths relative to the videos folder, ``/``-separated, in row order), ``skipped``
  (``{relative path: reason}``), ``checkpoint`` (absolute path or null), ``preset`` (name or null),
  ``num_frames``, ``input_size`` ``[H, W]``, and ``format``, ``version``, ``model_type``, ``dim``,
  ``videos_root``, ``precision``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

# the encoding half lives in .encode (imported by models.py, so it must not import the factory); re-exported here
from .encode import (VIDEO_EXTENSIONS, VideoFiles, encode_video_files, list_videos, split_sentences,
                     tokenize_paragraphs)

__all__ = ["VIDEO_EXTENSIONS", "split_sentences", "tokenize_paragraphs", "list_videos", "VideoFiles",
           "encode_video_files", "Index", "write_index", "read_index", "load_model", "resolve_device",
           "resolve_precision", "embed_videos"]

INDEX_FORMAT = "lfvila-index"
INDEX_VERSION = 1
log = logging.getLogger("lfvila.embed")

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- the index ------------------------------------------------------------------------------------------------------


@dataclass
class Index:
    """An index read back: ``features`` float32 ``(N, E)``, ``ids`` (N), and the rest of ``PREFIX.json``."""

    features: torch.Tensor
    ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.meta.get("skipped") or {})


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_index(prefix: str | os.PathLike, features: torch.Tensor, ids: Sequence[str], meta: dict[str, Any]) -> dict:
    """Writes ``PREFIX.safetensors`` (``features`` as float32) and ``PREFIX.json`` (``meta`` with ``ids``, the
    format name and version, and ``dim``). Each file is written under a temporary name and moved into place.
    Returns the JSON written."""
    from safetensors.torch import save

    prefix = os.fspath(prefix)
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"features must be a (N, E) tensor, got {getattr(features, 'shape', type(features))}")
    if features.shape[0] != len(ids):
        raise ValueError(f"features has {features.shape[0]} rows but {len(ids)} ids were given")
    d = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(d, exist_ok=True)
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **meta, "ids": list(ids),
           "dim": int(features.shape[1])}
    doc.setdefault("skipped", {})
    tensors = {"features": features.detach().to("cpu", torch.float32).contiguous()}
    _atomic_write(prefix + ".safetensors", save(tensors, metadata={"format": "pt"}))
    _atomic_write(prefix + ".json", (json.dumps(doc, indent=2) + "\n").encode())
    return doc


def read_index(prefix: str | os.PathLike) -> Index:
    """Reads ``PREFIX.json`` and ``PREFIX.safetensors`` (``PREFIX`` may also be given with either suffix)."""
    from safetensors.torch import load_file

    prefix = os.fspath(prefix)
    for ext in (".json", ".safetensors"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    for ext in (".json", ".safetensors"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"index file not found: {prefix + ext} (write one with `lfvila embed`)")
    with open(prefix + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{prefix}.json is not an lfvila index (format {meta.get('format')!r})")
    features = load_file(prefix + ".safetensors")["features"]
    ids = list(meta.pop("ids"))
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise ValueError(f"{prefix}: features {tuple(features.shape)} do not match the {len(ids)} ids")
    return Index(features.float(), ids, meta)


# -- models ---------------------------------------------------------------------------------------------------------


def load_model(checkpoint: Optional[str] = None, preset: Optional[str] = None, device: str | torch.device = "cpu"):
    """The model to embed with: an own-format checkpoint folder (`save_pretrained`, a run's checkpoint), or a
    preset. A preset has no trained video tower (only the tiny presets bundle a MiniLM text tower), so its
    ranking means little; it is built from seed 0, so `search` rebuilds the very same weights. The model must
    be a pre-training or retrieval model (their VPC features are what the retrieval evaluation scores)."""
    from .. import create_model, load_pretrained
    from ..presets import PRESET_INITS

    if (checkpoint is None) == (preset is None):
        raise ValueError("give exactly one of checkpoint (an own-format folder) and preset (a preset name)")
    if checkpoint is not None:
        model = load_pretrained(os.fspath(checkpoint), strict=True)
    else:
        log.warning("preset %s: weights not trained for retrieval (seeded random video tower); use a checkpoint "
                    "for meaningful rankings", preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(preset, pretrained=preset in PRESET_INITS)
    if not hasattr(model, "encode_videos"):
        raise ValueError(f"embedding needs a pre-training or retrieval model (model_type 'pretrain' or "
                         f"'retrieval'), got model_type {model.config.model_type!r}")
    return model.to(device).eval()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on the CPU. fp16/bf16 on the
    CPU fall back to fp32 (autocast is used on CUDA only)."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def embed_videos(videos: str | Sequence[str], out: str, *, checkpoint: Optional[str] = None,
                 preset: Optional[str] = None, batch_size: int = 8, num_workers: Optional[int] = None,
                 device: str = "auto", precision: str = "auto", progress: bool = True) -> dict:
    """`lfvila embed`: encodes every video under ``videos`` and writes the index ``out`` (see the module
    docstring). Returns the JSON written (with ``ids``)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    root, ids, paths = list_videos(videos)
    if not paths:
        raise ValueError(f"no video files under {videos} (extensions {', '.join(VIDEO_EXTENSIONS)})")
    model = load_model(checkpoint, preset, dev)
    feats, kept, skipped = encode_video_files(model, paths, ids, batch_size=batch_size, num_workers=num_workers,
                                              autocast_dtype=PRECISIONS[prec], progress=progress)
    v = model.config.video
    meta = {"checkpoint": os.path.abspath(checkpoint) if checkpoint is not None else None, "preset": preset,
            "model_type": model.config.model_type, "num_frames": v.num_frames, "input_size": list(v.input_size),
            "videos_root": root, "precision": prec, "skipped": skipped}
    return write_index(out, feats, kept, meta)
