"""Embedding your own videos: files -> sampled frames -> features -> an index on disk (`lfvila embed`).

Frames are sampled exactly as the retrieval evaluation samples them (`RetrievalDataset` with ``train=False``):
:func:`~lfvila_model.data.video.downstream_indices` (F frames evenly over the whole video) and
:func:`~lfvila_model.data.video.eval_transform` (Resize -> CenterCrop -> Resize to the model's input size), so
the features are those the evaluation scores. Decoding runs in DataLoader worker processes; a file that cannot
be decoded is skipped and reported with its reason, never fatal.

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
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import collate
from ..data.video import VideoReadError, downstream_indices, eval_transform, load_video

__all__ = ["VIDEO_EXTENSIONS", "split_sentences", "tokenize_paragraphs", "list_videos", "VideoFiles",
           "encode_video_files", "Index", "write_index", "read_index", "load_model", "resolve_device",
           "resolve_precision", "embed_videos"]

log = logging.getLogger("lfvila.embed")

# what a folder scan picks up; files named one by one are tried whatever their extension
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ts", ".ogv")
INDEX_FORMAT = "lfvila-index"
INDEX_VERSION = 1
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- text -----------------------------------------------------------------------------------------------------------

# white space after sentence-final punctuation, possibly behind one closing quote or bracket
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_sentences(text: str) -> list[str]:
    """Splits a paragraph into sentences: at white space after ``.``, ``!`` or ``?`` (or after one closing quote
    or bracket behind them), and at every line break; sentences are stripped and empty ones dropped.

    A deliberately simple rule, with no list of abbreviations: "Mr. Smith walks." gives two sentences. Pass a
    list of sentences where that matters. Example: ``'A man opens a door. He says "hi!" Then he\\nwalks in'`` ->
    ``['A man opens a door.', 'He says "hi!"', 'Then he', 'walks in']``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_BREAK.split(line) if s.strip()]


def _as_sentences(paragraph: Any, i: int) -> list[str]:
    if isinstance(paragraph, str):
        sentences = split_sentences(paragraph)
    elif isinstance(paragraph, (list, tuple)) and all(isinstance(s, str) for s in paragraph):
        sentences = [s.strip() for s in paragraph if s.strip()]
    else:
        raise TypeError(f"paragraphs[{i}] must be a string or a list of strings, got {paragraph!r:.80}")
    if not sentences:
        raise ValueError(f"paragraphs[{i}] has no text")
    return sentences


def tokenize_paragraphs(paragraphs: str | Sequence, config, tokenizer_dir: Optional[str] = None):
    """Paragraphs -> ``(input_ids, attention_mask)``, int64 ``(N, M, L)``, with the evaluation's tokenizer
    (:class:`~lfvila_model.data.text.ParagraphTokenizer`, M = ``config.num_sentences``, L =
    ``config.max_sentence_len``). ``paragraphs``: one paragraph or a list; a paragraph is a string (split by
    :func:`split_sentences`) or a list of sentences."""
    from ..data.text import ParagraphTokenizer

    if isinstance(paragraphs, str):
        paragraphs = [paragraphs]
    if not isinstance(paragraphs, (list, tuple)) or not paragraphs:
        raise ValueError(f"paragraphs must be a non-empty list of paragraphs, got {paragraphs!r:.80}")
    tok = ParagraphTokenizer(tokenizer_dir, num_sentences=config.num_sentences, max_length=config.max_sentence_len)
    items = [tok(_as_sentences(p, i)) for i, p in enumerate(paragraphs)]
    return torch.stack([t["input_ids"] for t in items]), torch.stack([t["attention_mask"] for t in items])


# -- video files ----------------------------------------------------------------------------------------------------


def _relative_id(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def list_videos(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, list[str], list[str]]:
    """The videos named by ``inputs``: one folder (searched recursively for :data:`VIDEO_EXTENSIONS`, hidden
    files and folders left out), or files (taken whatever their extension), or a mix.

    Returns ``(root, ids, paths)``: ``root`` is the absolute folder the ids are relative to (the folder itself
    when one folder is given, else the deepest folder holding every input), ``ids`` the relative paths
    (``/``-separated, sorted) and ``paths`` the matching absolute paths (symlinks are not resolved).
    """
    if isinstance(inputs, (str, bytes)) or hasattr(inputs, "__fspath__"):
        inputs = [inputs]
    inputs = [os.path.abspath(os.fspath(p)) for p in inputs]
    if not inputs:
        raise ValueError("no videos given")
    paths = []
    for p in inputs:
        if os.path.isdir(p):
            for d, dirs, files in os.walk(p):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                paths += [os.path.join(d, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)]
        elif os.path.exists(p) or os.path.islink(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        root = inputs[0]
    else:
        root = os.path.commonpath([p if os.path.isdir(p) else os.path.dirname(p) for p in inputs])
    paths = sorted(set(paths), key=lambda p: _relative_id(p, root))
    return root, [_relative_id(p, root) for p in paths], paths


class VideoFiles(Dataset):
    """Video files sampled as the retrieval evaluation samples them.

    Args:
        paths: video files.
        num_frames: F frames per video (``config.video.num_frames``).
        size: ``(H, W)`` output size (``config.video.input_size``).
        ids: the name reported for each file (default: the path).
    Items: ``{"video": float32 (3, F, H, W), "index", "video_id"}``, or for a file that cannot be decoded
    ``{"skipped": True, "index", "path": its id, "reason"}`` (:func:`~lfvila_model.data.datasets.collate` lists
    those under ``batch["skipped"]``).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], num_frames: int, size: tuple[int, int],
                 ids: Optional[Sequence[str]] = None):
        self.paths = [os.fspath(p) for p in paths]
        self.ids = list(ids) if ids is not None else list(self.paths)
        if len(self.ids) != len(self.paths):
            raise ValueError(f"ids must name every path: {len(self.ids)} ids for {len(self.paths)} paths")
        self.num_frames = int(num_frames)
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, vid = self.paths[index], self.ids[index]
        try:
            frames, _ = load_video(path, lambda n: downstream_indices(n, self.num_frames, False))
            video = eval_transform(frames, self.size)
        except VideoReadError as e:
            return {"skipped": True, "index": index, "path": vid, "reason": e.reason}
        except Exception as e:  # noqa: BLE001 (a user's folder may hold anything: report it, never stop the run)
            return {"skipped": True, "index": index, "path": vid, "reason": f"{type(e).__name__}: {e}"}
        return {"video": video, "index": index, "video_id": vid}


def encode_video_files(model, paths: Sequence[str | os.PathLike], ids: Optional[Sequence[str]] = None, *,
                       batch_size: int = 8, num_workers: int = 0, autocast_dtype: Optional[torch.dtype] = None,
                       progress: bool = False) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Features of the readable files, skipping the others.

    Args:
        model: an `LFVILAPretrain` or `LFVILARetrieval` (anything with `encode_videos` and a `config`).
        paths, ids: the files and the names to report them by (default: the paths).
        batch_size, num_workers: DataLoader batch size and decoding processes.
        autocast_dtype: CUDA autocast dtype (None: the model's dtype).
    Returns:
        ``(features float32 (N, E), ids of the N rows in order, {id: reason} of the skipped files)``.
    """
    from tqdm.auto import tqdm

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    v = model.config.video
    ds = VideoFiles(paths, v.num_frames, v.input_size, ids)
    pin = next(model.parameters()).device.type == "cuda"
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin)
    feats, kept, skipped = [], [], {}
    with tqdm(total=len(ds), desc="embedding", unit="video", disable=not progress) as bar:
        for b in loader:
            for s in b["skipped"]:
                log.info("skipping %s: %s", s["path"], s["reason"])
                skipped[s["path"]] = s["reason"]
            if b["size"]:
                feats.append(model.encode_videos(b["video"], batch_size=b["size"], autocast_dtype=autocast_dtype))
                kept += b["video_id"]
            bar.update(b["size"] + len(b["skipped"]))
            bar.set_postfix(skipped=len(skipped))
    out = torch.cat(feats) if feats else torch.empty(0, model.embedding_dim)
    return out, kept, skipped


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
                 preset: Optional[str] = None, batch_size: int = 8, num_workers: int = 2, device: str = "auto",
                 precision: str = "auto", progress: bool = True) -> dict:
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
