"""Torch datasets for QA and classification fine-tuning (spec 4.2, formats of spec 5), with skip-and-count of bad
videos exactly as :mod:`lfvila_model.data.datasets` does it.

Video: every dataset here samples like :class:`~lfvila_model.data.datasets.RetrievalDataset`: ``num_frames``
(32 officially) by ``linspace`` over the whole ``<video_root>/<id>.mp4``, with the train jitter of the two ends,
and the train / eval transforms of :mod:`lfvila_model.data.video` (one crop for every frame of a video).

Items (one per annotation record; K candidates, M sentences of L tokens, F frames, C classes)::

    dataset                     text input_ids / attention_mask   label (item "label")      extra
    How2QADataset               (K, M, L), M = 2 + max_subtitles    answer_idx in [0, K)    span_labels int64 (F,)
    ViolinDataset               (M, L),    M = 1 + max_subtitles    answer in {0, 1}
    ActivityNetQADataset        (M, L),    question only            answer class in [0, C)
    VideoClassificationDataset  none                                class id in [0, C)

plus ``video float32 (3, F, H, W)``, ``index`` and ``video_id`` as in the other datasets, and ``num_sentences``
(an int; a list of K ints for How2QA). :func:`~lfvila_model.data.datasets.collate` stacks them into
``labels (B,)``, ``span_labels (B, F)``, ``input_ids (B, K, M, L)`` / ``(B, M, L)`` and ``num_sentences (B, K)`` /
``(B,)``.

Subtitles: spec 4.2 allows "up to 6" (How2QA) / "up to 4" (VIOLIN) subtitle sentences and spec 5 does not say
which; these datasets take the first ones in the order the annotation lists them (a video's subtitles are listed
in time order). Subtitle times are not used.

A missing, truncated or undecodable video does not raise: the item comes back as ``{"skipped": True, "index",
"path", "reason"}``, is logged, recorded in ``dataset.skipped`` and counted by the caller's ``SkipTracker``.
"""

from __future__ import annotations

import abc
import os
from typing import Any, Sequence

import numpy as np
import torch

from . import annotations as ann
from .datasets import VideoTextDataset, check_pos_int
from .text import ParagraphTokenizer
from .video import FrameCache, VideoReadError, downstream_indices, load_video, video_fps

__all__ = ["How2QADataset", "ViolinDataset", "ActivityNetQADataset", "VideoClassificationDataset",
           "span_frame_labels", "HOW2QA_DEFAULT_FPS"]

# spec 5: How2QA videos were re-encoded at 3 fps and its span labels assume that rate
HOW2QA_DEFAULT_FPS = 3.0


def span_frame_labels(frame_indices: Sequence[int] | np.ndarray, fps: float,
                      span: tuple[float, float]) -> torch.Tensor:
    """Per-frame question-span labels: frame i (a frame index of the video) lies at ``i / fps`` seconds; its label
    is 1 when ``span[0] <= i / fps <= span[1]`` (both ends inclusive), else 0.

    Args:
        frame_indices: int ``(F,)``, indices of the sampled frames in the decoded video.
        fps: frames per second of the decoded video (> 0).
        span: ``(start_s, end_s)`` of the question, in seconds.
    Returns: int64 ``(F,)`` of 0/1.

    Example: frames ``[0, 2, 4, 6, 9]`` at 2 fps are at 0, 1, 2, 3, 4.5 s; span (1, 3) gives ``[0, 1, 1, 1, 0]``.
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    t = np.asarray(frame_indices, dtype=np.float64) / float(fps)
    return torch.from_numpy(((t >= span[0]) & (t <= span[1])).astype(np.int64))


def _check_records(records, cls, name: str) -> list:
    out = list(records)
    for i, r in enumerate(out):
        if not isinstance(r, cls):
            raise TypeError(f"{name}[{i}] must be a {cls.__name__}, got {type(r).__name__}")
    return out


def _check_labels(labels: Sequence[int], num_labels: int | None, what: str, ids: Sequence[str]) -> int | None:
    """Labels must index the model's classes: a bad one found here names its record, instead of a cross-entropy
    index error deep inside a training step."""
    if num_labels is None:
        return None
    num_labels = check_pos_int("num_labels", num_labels)
    for i, (lab, vid) in enumerate(zip(labels, ids)):
        if not 0 <= lab < num_labels:
            raise ValueError(f"record {i} ({vid!r}): {what} {lab} is outside [0, num_labels={num_labels})")
    return num_labels


class _WholeVideoDataset(VideoTextDataset, abc.ABC):
    """Records with one video each at ``<video_root>/<id><ext>``, sampled as the retrieval dataset does. A dataset
    of this kind says only what its item holds (`_item`); reading the video and skipping unreadable ones is here."""

    def __init__(self, records: list, ids: list[str], video_root: str | os.PathLike,
                 tokenizer: ParagraphTokenizer | None, num_frames: int, size: tuple[int, int], train: bool,
                 seed: int, cache: FrameCache | None, ext: str, antialias: bool):
        super().__init__(tokenizer, size, train, seed, cache, antialias)
        self.records = records
        self._ids = ids
        self.num_frames = check_pos_int("num_frames", num_frames)
        if not isinstance(video_root, (str, os.PathLike)):
            raise TypeError(f"video_root must be a str or os.PathLike, got {type(video_root).__name__}")
        self.video_root = os.fspath(video_root)
        if not isinstance(ext, str):
            raise TypeError(f"ext must be a string such as '.mp4', got {ext!r}")
        self.ext = ext

    def __len__(self) -> int:
        return len(self.records)

    def clip_paths(self, index: int) -> list[str]:
        """The video file of item ``index`` (one per item; used by :func:`datasets.preload_videos`)."""
        return [ann.retrieval_video_path(self.video_root, self._ids[index], self.ext)]

    def _video(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, str]:
        """``(video (3, F, H, W), sampled frame indices (F,), path)``; raises VideoReadError for a bad file."""
        path = self.clip_paths(index)[0]
        frames, idx = load_video(path, lambda n: downstream_indices(n, self.num_frames, self.train, rng),
                                 self.cache)
        return self._transform(frames, rng), idx, path

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            video, idx, path = self._video(index, self._rng(index))
            return self._item(index, video, idx, path)
        except VideoReadError as e:  # from decoding, or from reading the header in _item (How2QA's frame rate)
            return self._skip(index, e)

    @abc.abstractmethod
    def _item(self, index: int, video: torch.Tensor, idx: np.ndarray, path: str) -> dict[str, Any]:
        """The item of a readable video: `video`, its frame indices `idx` in the file and its `path`."""

    def _base_item(self, index: int, video: torch.Tensor, label: int) -> dict[str, Any]:
        return {"video": video, "index": index, "video_id": self._ids[index], "label": int(label)}


class How2QADataset(_WholeVideoDataset):
    """How2QA multiple choice (spec 4.2): per candidate the text is [question, answer, first subtitles].

    Args:
        records: :class:`~lfvila_model.data.annotations.How2QARecord` list, or a How2QA jsonl path.
        video_root: videos live at ``<video_root>/<clip_id><ext>``.
        tokenizer: a :class:`ParagraphTokenizer` with ``num_sentences == 2 + max_subtitles`` (8 x 50 officially);
            None returns the raw sentences (``sentences``: K lists) instead of token ids.
        num_frames: F (32 officially), sampled as in :class:`~lfvila_model.data.datasets.RetrievalDataset`.
        num_choices: K, answers every record must have (4).
        max_subtitles: subtitles per candidate (6): the first ones of ``text_s``, in the listed order (spec 4.2
            says "up to 6" and neither it nor the format says which; the list is in time order).
        fps: frame rate used to place the sampled frames in time for the span labels. None (default): the
            video's own rate from its header, and 3 fps (the rate spec 5 says How2QA spans assume) when the header
            has none. A number: that rate for every video (3.0 reproduces the official assumption exactly).
    Items: ``input_ids``/``attention_mask (K, M, L)``, ``num_sentences`` list of K ints, ``label`` = answer_idx,
    ``span_labels int64 (F,)`` (:func:`span_frame_labels` of the sampled frame indices), ``fps`` used.
    """

    def __init__(self, records: Sequence[ann.How2QARecord] | str | os.PathLike, video_root: str | os.PathLike,
                 tokenizer: ParagraphTokenizer | None, *, num_frames: int = 32, num_choices: int = 4,
                 max_subtitles: int = 6, fps: float | None = None, size: tuple[int, int] = (192, 320),
                 train: bool = False, seed: int = 0, cache: FrameCache | None = None, ext: str = ".mp4",
                 antialias: bool = False):
        if isinstance(records, (str, os.PathLike)):
            records = ann.read_how2qa_jsonl(records)
        records = _check_records(records, ann.How2QARecord, "records")
        super().__init__(records, [r.clip_id for r in records], video_root, tokenizer, num_frames, size, train,
                         seed, cache, ext, antialias)
        self.num_choices = check_pos_int("num_choices", num_choices)
        if isinstance(max_subtitles, bool) or not isinstance(max_subtitles, int) or max_subtitles < 0:
            raise ValueError(f"max_subtitles must be a non-negative integer, got {max_subtitles!r}")
        self.max_subtitles = max_subtitles
        if tokenizer is not None and tokenizer.num_sentences != 2 + max_subtitles:
            # fewer rows would make the tokenizer merge question and answer into one sentence
            raise ValueError(f"tokenizer.num_sentences must be 2 + max_subtitles = {2 + max_subtitles} (question, "
                             f"answer, subtitles), got {tokenizer.num_sentences}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise ValueError(f"fps must be a positive number or None (the video's own rate), got {fps!r}")
        self.fps = None if fps is None else float(fps)
        self._fps_of: dict[str, float] = {}
        for i, r in enumerate(records):
            if len(r.answers) != self.num_choices:
                raise ValueError(f"record {i} ({r.clip_id!r}) has {len(r.answers)} answers; every record needs "
                                 f"num_choices={self.num_choices} (candidates are stacked)")
            if r.span[0] > r.span[1]:
                raise ValueError(f"record {i} ({r.clip_id!r}): span {list(r.span)} must be [start_s, end_s] with "
                                 f"start_s <= end_s")

    def candidate_sentences(self, index: int) -> list[list[str]]:
        """The K sentence lists of item ``index``: ``[question, answer_k, subtitle_0, ..., subtitle_{S-1}]``."""
        r = self.records[index]
        subs = [s.text for s in r.subtitles[:self.max_subtitles]]
        return [[r.question, a, *subs] for a in r.answers]

    def _fps(self, path: str) -> float:
        if self.fps is not None:
            return self.fps
        # one header read per video and process (DataLoader workers each keep their own), not one per item: with
        # the frame cache the header is the only file access left
        fps = self._fps_of.get(path)
        if fps is None:
            fps = self._fps_of[path] = video_fps(path) or HOW2QA_DEFAULT_FPS
        return fps

    def _item(self, index: int, video: torch.Tensor, idx: np.ndarray, path: str) -> dict[str, Any]:
        r = self.records[index]
        fps = self._fps(path)
        item = self._base_item(index, video, r.answer_idx)
        item["span_labels"] = span_frame_labels(idx, fps, r.span)
        item["fps"] = fps
        cands = self.candidate_sentences(index)
        if self.tokenizer is None:
            item["sentences"] = cands
            return item
        enc = [self.tokenizer(c) for c in cands]
        item["input_ids"] = torch.stack([e["input_ids"] for e in enc])
        item["attention_mask"] = torch.stack([e["attention_mask"] for e in enc])
        item["num_sentences"] = [e["num_sentences"] for e in enc]
        return item


class ViolinDataset(_WholeVideoDataset):
    """VIOLIN as classification (spec 4.2): text [statement, first subtitles], label = ``answer`` (1: true).

    Args:
        records: :class:`~lfvila_model.data.annotations.ViolinRecord` list, or a VIOLIN jsonl path.
        tokenizer: :class:`ParagraphTokenizer` with ``num_sentences == 1 + max_subtitles`` (5 x 30 officially).
        max_subtitles: the first ``max_subtitles`` (4) subtitles, in the listed order (which ones is not in the
            spec; see the module docstring).
        num_labels: when given, every label must be in [0, num_labels) (checked at construction).
        other arguments: as :class:`How2QADataset`.
    Items: ``input_ids``/``attention_mask (M, L)``, ``label``.
    """

    def __init__(self, records: Sequence[ann.ViolinRecord] | str | os.PathLike, video_root: str | os.PathLike,
                 tokenizer: ParagraphTokenizer | None, *, num_frames: int = 32, max_subtitles: int = 4,
                 num_labels: int | None = None, size: tuple[int, int] = (192, 320), train: bool = False,
                 seed: int = 0, cache: FrameCache | None = None, ext: str = ".mp4", antialias: bool = False):
        if isinstance(records, (str, os.PathLike)):
            records = ann.read_violin_jsonl(records)
        records = _check_records(records, ann.ViolinRecord, "records")
        super().__init__(records, [r.clip_id for r in records], video_root, tokenizer, num_frames, size, train,
                         seed, cache, ext, antialias)
        if isinstance(max_subtitles, bool) or not isinstance(max_subtitles, int) or max_subtitles < 0:
            raise ValueError(f"max_subtitles must be a non-negative integer, got {max_subtitles!r}")
        self.max_subtitles = max_subtitles
        if tokenizer is not None and tokenizer.num_sentences != 1 + max_subtitles:
            raise ValueError(f"tokenizer.num_sentences must be 1 + max_subtitles = {1 + max_subtitles} (statement, "
                             f"subtitles), got {tokenizer.num_sentences}")
        self.num_labels = _check_labels([r.label for r in records], num_labels, "answer", self._ids)

    def sentences(self, index: int) -> list[str]:
        r = self.records[index]
        return [r.statement, *(s.text for s in r.subtitles[:self.max_subtitles])]

    def _item(self, index: int, video: torch.Tensor, idx: np.ndarray, path: str) -> dict[str, Any]:
        item = self._base_item(index, video, self.records[index].label)
        item.update(self._text(self.sentences(index)))
        return item


class ActivityNetQADataset(_WholeVideoDataset):
    """ActivityNet-QA as classification over the answer vocabulary (spec 4.2): text = the question (1 x 50
    officially), label = ``answer`` (class id, 1654 classes officially). Videos: ``<video_root>/<video_name><ext>``.

    Args: as :class:`ViolinDataset` (the tokenizer's extra sentence rows, if any, stay all-[PAD]).
    Items: ``input_ids``/``attention_mask (M, L)``, ``label``.
    """

    def __init__(self, records: Sequence[ann.ActivityNetQARecord] | str | os.PathLike,
                 video_root: str | os.PathLike, tokenizer: ParagraphTokenizer | None, *, num_frames: int = 32,
                 num_labels: int | None = None, size: tuple[int, int] = (192, 320), train: bool = False,
                 seed: int = 0, cache: FrameCache | None = None, ext: str = ".mp4", antialias: bool = False):
        if isinstance(records, (str, os.PathLike)):
            records = ann.read_activitynet_qa_jsonl(records)
        records = _check_records(records, ann.ActivityNetQARecord, "records")
        super().__init__(records, [r.video_name for r in records], video_root, tokenizer, num_frames, size, train,
                         seed, cache, ext, antialias)
        self.num_labels = _check_labels([r.answer for r in records], num_labels, "answer", self._ids)

    def _item(self, index: int, video: torch.Tensor, idx: np.ndarray, path: str) -> dict[str, Any]:
        r = self.records[index]
        item = self._base_item(index, video, r.answer)
        item.update(self._text([r.question]))
        return item


class VideoClassificationDataset(_WholeVideoDataset):
    """Video-only classification (COIN, LVU; spec 4.2): no text, label = the record's class id.

    Args:
        records: :class:`~lfvila_model.data.annotations.ClassificationRecord` list, or a jsonl path read with
            ``label_key`` / ``id_key`` (``recipe_type`` / ``video_id`` for COIN).
        num_labels: when given, every label must be in [0, num_labels).
        other arguments: as :class:`How2QADataset`. Videos: ``<video_root>/<video_id><ext>``.
    Items: ``video``, ``label`` (no text fields).
    """

    def __init__(self, records: Sequence[ann.ClassificationRecord] | str | os.PathLike,
                 video_root: str | os.PathLike, *, label_key: str = "recipe_type", id_key: str = "video_id",
                 num_frames: int = 32, num_labels: int | None = None, size: tuple[int, int] = (192, 320),
                 train: bool = False, seed: int = 0, cache: FrameCache | None = None, ext: str = ".mp4",
                 antialias: bool = False):
        if isinstance(records, (str, os.PathLike)):
            records = ann.read_classification_jsonl(records, label_key=label_key, id_key=id_key)
        records = _check_records(records, ann.ClassificationRecord, "records")
        super().__init__(records, [r.video_id for r in records], video_root, None, num_frames, size, train, seed,
                         cache, ext, antialias)
        self.num_labels = _check_labels([r.label for r in records], num_labels, "label", self._ids)

    def _item(self, index: int, video: torch.Tensor, idx: np.ndarray, path: str) -> dict[str, Any]:
        return self._base_item(index, video, self.records[index].label)
