"""Encoding files and text the way the retrieval evaluation does, for `lfvila embed` and the models'
`encode_videos` / `encode_paragraphs`.

Frames are sampled exactly as the retrieval evaluation samples them (`RetrievalDataset` with ``train=False``):
:func:`~lfvila_model.data.video.downstream_indices` (F frames evenly over the whole video) and
:func:`~lfvila_model.data.video.eval_transform` (Resize -> CenterCrop -> Resize to the model's input size).
Decoding runs in DataLoader worker processes (`data.loader.make_loader`); a file that cannot be decoded is
skipped and reported with its reason, never fatal. This module imports no model code, so `models.py` may use it.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..data.datasets import collate
from ..data.loader import make_loader
from ..data.video import VideoReadError, downstream_indices, eval_transform, load_video

__all__ = ["VIDEO_EXTENSIONS", "split_sentences", "tokenize_paragraphs", "list_videos", "VideoFiles",
           "encode_video_files"]

log = logging.getLogger("lfvila.embed")

# what a folder scan picks up; files named one by one are tried whatever their extension
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ts", ".ogv")

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
                       batch_size: int = 8, num_workers: Optional[int] = 0,
                       autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Features of the readable files, skipping the others.

    Args:
        model: an `LFVILAPretrain` or `LFVILARetrieval` (anything with `encode_videos` and a `config`).
        paths, ids: the files and the names to report them by (default: the paths).
        batch_size, num_workers: DataLoader batch size and decoding processes (None: min(8, CPUs - 1), as
            `data.num_workers`).
        autocast_dtype: CUDA autocast dtype (None: the model's dtype).
    Returns:
        ``(features float32 (N, E), ids of the N rows in order, {id: reason} of the skipped files)``.
    """
    from tqdm.auto import tqdm

    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative integer or None (automatic), got {num_workers!r}")
    v = model.config.video
    ds = VideoFiles(paths, v.num_frames, v.input_size, ids)
    # the training loader's worker machinery: start method, pinned memory on CUDA, prefetch
    loader = make_loader(ds, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                         device=next(model.parameters()).device)
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
