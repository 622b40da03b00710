"""Torch datasets for LF-VILA pre-training and paragraph-to-video retrieval, with skip-and-count of bad videos
(the QA and classification fine-tuning datasets build on the same base in :mod:`lfvila_model.data.qa`).

Items (one per annotation record)::

    video           float32 (3, F, H, W)   ImageNet-normalised frames, one crop for the whole video
    input_ids       int64   (M, L)         M sentences of L tokens (all-[PAD] rows for missing sentences)
    attention_mask  int64   (M, L)
    num_sentences   int                    real (non-padding) sentences
    index           int                    position in the dataset
    video_id        str

A missing, truncated or undecodable video does not raise: the item comes back as
``{"skipped": True, "index", "path", "reason"}``, it is logged (with its path) on the ``lfvila.data`` logger,
and :func:`collate` drops it from the batch and lists it under ``batch["skipped"]``. A :class:`SkipTracker` in
the training/eval loop counts distinct skipped items and stops the run with :class:`TooManySkippedError` once
they exceed ``max_skip_fraction`` of the dataset. (Counting happens on the collated batches, in the main
process, so it is right with any number of DataLoader workers.)

Randomness (clip window, frame jitter, crop, flip) comes from ``numpy.random.default_rng([seed, epoch, index])``:
an item depends only on (seed, epoch, index), never on worker count or iteration order, which keeps resumed
and distributed runs reproducible. Call :meth:`set_epoch` each epoch (the trainer's loader,
:mod:`lfvila_model.data.loader`, passes the epoch with every batch request, so it reaches persistent workers).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import annotations as ann
from .text import ParagraphTokenizer
from .video import (FrameCache, VideoReadError, clip_segment_indices, decode_all_frames, downstream_indices,
                    eval_transform, load_video, source_name, train_transform)

__all__ = ["PretrainDataset", "RetrievalDataset", "collate", "SkipTracker", "TooManySkippedError",
           "preload_videos"]

log = logging.getLogger("lfvila.data")


class TooManySkippedError(RuntimeError):
    """More videos were unreadable than the configured fraction of the dataset allows."""


def check_pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_size(size: Any) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be (height, width) positive integers, got {size!r}")
    return int(size[0]), int(size[1])


class VideoTextDataset(Dataset):
    """Shared machinery: tokenizer, transform choice, per-item RNG, skip handling."""

    def __init__(self, tokenizer: ParagraphTokenizer | None, size: tuple[int, int], train: bool, seed: int,
                 cache: FrameCache | None, antialias: bool = False):
        if tokenizer is not None and not isinstance(tokenizer, ParagraphTokenizer):
            raise TypeError(f"tokenizer must be a ParagraphTokenizer or None, got {type(tokenizer).__name__}")
        if cache is not None and not isinstance(cache, FrameCache):
            raise TypeError(f"cache must be a FrameCache or None, got {type(cache).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.tokenizer = tokenizer
        self.size = _check_size(size)
        self.train = bool(train)
        self.seed = int(seed)
        self.cache = cache
        self.antialias = bool(antialias)
        self.epoch = 0
        self.skipped: dict[int, str] = {}  # index -> path, for in-process use (num_workers=0)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random draws of every item (training); eval items do not depend on it."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _transform(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if self.train:
            return train_transform(frames, self.size, rng, antialias=self.antialias)
        return eval_transform(frames, self.size, antialias=self.antialias)

    def _text(self, sentences: Sequence[str]) -> dict[str, Any]:
        if self.tokenizer is None:
            return {"sentences": list(sentences)}
        return self.tokenizer(list(sentences))

    def _skip(self, index: int, err: VideoReadError) -> dict[str, Any]:
        log.warning("skipping item %d: %s", index, err)
        self.skipped[index] = err.path
        return {"skipped": True, "index": index, "path": err.path, "reason": err.reason}


class PretrainDataset(VideoTextDataset):
    """Pre-training items: ``num_clips`` consecutive clips of one video, clip m <-> sentence m (spec 5).

    Args:
        samples: pre-training records (:func:`annotations.read_pretrain_jsonl`) or a jsonl path.
        video_root: clip files live at ``<video_root>/<clip_id up to '.'>/<clip_id>``.
        tokenizer: a :class:`ParagraphTokenizer` with ``num_sentences == num_clips`` (None: raw sentences).
        num_clips: consecutive clips per item (4); a random window in training, the first ``num_clips`` in eval.
        frames_per_clip: frames taken from each clip at its segment starts (8 officially, 4 in the demo).
        size: output ``(height, width)``.
        train: train transform and random window, else eval transform and window 0.
        cache: a :class:`FrameCache` (decode each video once); antialias: see :func:`video.train_transform`.
    Items: ``video (3, num_clips * frames_per_clip, H, W)``, text ``(num_clips, L)``.
    """

    def __init__(self, samples: Sequence[ann.PretrainSample] | str | os.PathLike, video_root: str | os.PathLike,
                 tokenizer: ParagraphTokenizer | None, *, num_clips: int = 4, frames_per_clip: int = 8,
                 size: tuple[int, int] = (192, 320), train: bool = True, seed: int = 0,
                 cache: FrameCache | None = None, antialias: bool = False):
        super().__init__(tokenizer, size, train, seed, cache, antialias)
        if isinstance(samples, (str, os.PathLike)):
            samples = ann.read_pretrain_jsonl(samples)
        self.samples = list(samples)
        self.num_clips = check_pos_int("num_clips", num_clips)
        self.frames_per_clip = check_pos_int("frames_per_clip", frames_per_clip)
        if tokenizer is not None and tokenizer.num_sentences != self.num_clips:
            raise ValueError(f"tokenizer.num_sentences must equal num_clips={self.num_clips} (clip m <-> "
                             f"sentence m), got {tokenizer.num_sentences}")
        for i, s in enumerate(self.samples):
            if not isinstance(s, ann.PretrainSample):
                raise TypeError(f"samples[{i}] must be a PretrainSample, got {type(s).__name__}")
            if len(s.clips) < self.num_clips:
                raise ValueError(f"samples[{i}] has {len(s.clips)} clips, fewer than num_clips={self.num_clips}")
        self.video_root = os.fspath(video_root)

    def __len__(self) -> int:
        return len(self.samples)

    def clip_paths(self, index: int) -> list[str]:
        return [ann.clip_video_path(self.video_root, c.clip_id) for c in self.samples[index].clips]

    def window(self, index: int, rng: np.random.Generator) -> int:
        """First clip of the item's window: random in training, 0 in eval."""
        return self._window_start(len(self.samples[index].clips), rng)

    def _window_start(self, num_sample_clips: int, rng: np.random.Generator) -> int:
        extra = num_sample_clips - self.num_clips
        return int(rng.integers(0, extra, endpoint=True)) if self.train and extra > 0 else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        clips = self.samples[index].clips
        return self.make_item(index, [c.clip_id for c in clips], [c.text for c in clips],
                              lambda k: ann.clip_video_path(self.video_root, clips[k].clip_id))

    def make_item(self, index: int, clip_ids: Sequence[str], texts: Sequence[str],
                  source: Callable[[int], Any]) -> dict[str, Any]:
        """The item of the sample numbered ``index`` whose clips are ``clip_ids`` (one sentence of ``texts`` each):
        what ``self[index]`` returns for a sample of this dataset, for samples read from elsewhere too (tar
        shards, :mod:`lfvila_model.data.shard_stream`).

        ``source(k)`` gives clip k's video: a path or a binary file-like object (decoded from memory). The
        window, frames, crop and flip depend only on (seed, epoch, index); a clip that cannot be read gives the
        skip record (see the module doc).
        """
        if len(clip_ids) < self.num_clips or len(texts) != len(clip_ids):
            raise ValueError(f"a sample needs >= num_clips={self.num_clips} clips and one text per clip, got "
                             f"{len(clip_ids)} clips and {len(texts)} texts")
        rng = self._rng(index)
        w0 = self._window_start(len(clip_ids), rng)
        parts = []
        try:
            for k in range(w0, w0 + self.num_clips):
                src = source(k)
                frames, _ = load_video(src, lambda n: clip_segment_indices(n, self.frames_per_clip), self.cache)
                if parts and frames.shape[1:] != parts[0].shape[1:]:
                    raise VideoReadError(source_name(src), f"frame size {frames.shape[1:3]} differs from the "
                                                           f"item's first clip {parts[0].shape[1:3]}")
                parts.append(frames)
        except VideoReadError as e:
            return self._skip(index, e)
        item = {"video": self._transform(np.concatenate(parts), rng), "index": index,
                "video_id": clip_ids[w0].split(".", 1)[0]}
        item.update(self._text(list(texts[w0:w0 + self.num_clips])))
        return item


class RetrievalDataset(VideoTextDataset):
    """Paragraph-to-video retrieval items (spec 4.2): ``num_frames`` over the whole ``<video_root>/<clip_id>.mp4``.

    Args:
        records: retrieval records (:func:`annotations.read_retrieval_jsonl`) or a jsonl path.
        tokenizer: :class:`ParagraphTokenizer` (M = 4 for ActivityNet/DiDeMo/QuerYD, 1 for Condensed Movies).
        num_frames: F (32 officially): train jitter or eval linspace, see :func:`video.downstream_indices`.
    Items: ``video (3, F, H, W)``, text ``(M, L)``.
    """

    def __init__(self, records: Sequence[ann.RetrievalRecord] | str | os.PathLike, video_root: str | os.PathLike,
                 tokenizer: ParagraphTokenizer | None, *, num_frames: int = 32,
                 size: tuple[int, int] = (192, 320), train: bool = False, seed: int = 0,
                 cache: FrameCache | None = None, ext: str = ".mp4", antialias: bool = False):
        super().__init__(tokenizer, size, train, seed, cache, antialias)
        if isinstance(records, (str, os.PathLike)):
            records = ann.read_retrieval_jsonl(records)
        self.records = list(records)
        for i, r in enumerate(self.records):
            if not isinstance(r, ann.RetrievalRecord):
                raise TypeError(f"records[{i}] must be a RetrievalRecord, got {type(r).__name__}")
        self.num_frames = check_pos_int("num_frames", num_frames)
        self.video_root = os.fspath(video_root)
        self.ext = ext

    def __len__(self) -> int:
        return len(self.records)

    def clip_paths(self, index: int) -> list[str]:
        return [ann.retrieval_video_path(self.video_root, self.records[index].clip_id, self.ext)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        rec = self.records[index]
        path = ann.retrieval_video_path(self.video_root, rec.clip_id, self.ext)
        try:
            frames, _ = load_video(path, lambda n: downstream_indices(n, self.num_frames, self.train, rng),
                                   self.cache)
        except VideoReadError as e:
            return self._skip(index, e)
        item = {"video": self._transform(frames, rng), "index": index, "video_id": rec.clip_id}
        item.update(self._text(rec.sentences))
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the readable items and lists the skipped ones.

    Returns ``{"video": (B, 3, F, H, W), "input_ids": (B, M, L), "attention_mask": (B, M, L),
    "num_sentences": int64 (B,), "index": int64 (B,), "video_id": [str] * B, "size": B,
    "skipped": [{"index", "path", "reason"}, ...]}``. When every item was skipped, ``size`` is 0 and only
    ``size`` and ``skipped`` are present: the loop must skip that step.

    Fine-tuning items (:mod:`lfvila_model.data.qa`) add ``labels`` int64 ``(B,)`` (from each item's ``label``)
    and, for How2QA, ``span_labels`` int64 ``(B, F)``; multiple-choice text stacks to ``input_ids`` /
    ``attention_mask`` ``(B, K, M, L)`` and ``num_sentences`` ``(B, K)``. Video-only items have no text keys.
    """
    good = [it for it in items if not it.get("skipped")]
    skipped = [{k: it[k] for k in ("index", "path", "reason")} for it in items if it.get("skipped")]
    out: dict[str, Any] = {"size": len(good), "skipped": skipped}
    if not good:
        return out
    out["video"] = torch.stack([it["video"] for it in good])
    out["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    out["video_id"] = [it["video_id"] for it in good]
    if "input_ids" in good[0]:
        out["input_ids"] = torch.stack([it["input_ids"] for it in good])
        out["attention_mask"] = torch.stack([it["attention_mask"] for it in good])
        out["num_sentences"] = torch.tensor([it["num_sentences"] for it in good], dtype=torch.long)
    elif "sentences" in good[0]:
        out["sentences"] = [it["sentences"] for it in good]
    if "label" in good[0]:
        out["labels"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
    if "span_labels" in good[0]:
        out["span_labels"] = torch.stack([it["span_labels"] for it in good])
    return out


class SkipTracker:
    """Counts distinct skipped items across batches and stops the run past a bound.

    Args:
        total: items in the dataset (the denominator of the skipped fraction).
        max_skip_fraction: the run stops once ``skipped > max_skip_fraction * total`` (0 stops at the first bad
            video; 1 never stops).
    """

    def __init__(self, total: int, max_skip_fraction: float = 0.01):
        if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, (int, float)) \
                or not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be a number in [0, 1], got {max_skip_fraction!r}")
        self.total = int(total)
        self.max_skip_fraction = float(max_skip_fraction)
        self.skipped: dict[int, tuple[str, str]] = {}  # index -> (path, reason)

    @property
    def count(self) -> int:
        return len(self.skipped)

    @property
    def fraction(self) -> float:
        return self.count / self.total

    def update(self, batch: dict[str, Any]) -> None:
        """Records ``batch["skipped"]``; raises :class:`TooManySkippedError` past the bound."""
        for s in batch.get("skipped", ()):
            self.skipped.setdefault(int(s["index"]), (s["path"], s["reason"]))
        if self.count > self.max_skip_fraction * self.total:
            paths = ", ".join(p for p, _ in list(self.skipped.values())[:5])
            raise TooManySkippedError(
                f"{self.count} of {self.total} items ({100 * self.fraction:.2f}%) had unreadable videos, more "
                f"than max_skip_fraction={self.max_skip_fraction} allows; first: {paths}")

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.count, "total": self.total, "fraction": self.fraction,
                "paths": sorted({p for p, _ in self.skipped.values()})}


def _decode_for_preload(path: str):
    try:
        return path, decode_all_frames(path), None
    except VideoReadError as e:
        return path, None, e


def preload_videos(dataset: Dataset, progress: bool = True,
                   workers: int = 1) -> list[str]:
    """Decodes every video of ``dataset`` (any dataset of this package and of :mod:`.qa`: they all have
    ``clip_paths`` and ``cache``) into its cache once, before training (DataLoader workers forked
    afterwards then share a memory cache). ``workers > 1`` decodes in that many processes.

    Returns the paths that could not be read (logged; they stay uncached and their items will be skipped).
    """
    if dataset.cache is None:
        raise ValueError("dataset.cache is None: construct the dataset with a FrameCache to preload")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    import multiprocessing as mp

    from tqdm.auto import tqdm

    paths = sorted({p for i in range(len(dataset)) for p in dataset.clip_paths(i)})
    bad = []
    bar = tqdm(total=len(paths), desc="decoding videos", unit="video", disable=not progress)
    if workers == 1:
        results = map(_decode_for_preload, paths)
        pool = None
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(workers)
        results = pool.imap(_decode_for_preload, paths, chunksize=32)
    try:
        for path, frames, err in results:
            if err is None:
                dataset.cache.put(path, frames)
            else:
                log.warning("unreadable video: %s", err)
                bad.append(path)
            bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return bad
