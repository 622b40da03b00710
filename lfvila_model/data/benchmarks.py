"""The public paragraph-to-video retrieval benchmarks into the retrieval format: ActivityNet Captions and DiDeMo
(`lfvila prepare activitynet|didemo`; user guide: docs/benchmarks-data.md).

Input, in the annotation folder (a split whose file is absent is left out):

- ActivityNet Captions: ``train.json``, ``val_1.json``, ``val_2.json``, each
  ``{video_id: {"duration": s, "timestamps": [[start_s, end_s], ...], "sentences": [...]}}``.
  They become ``train.jsonl``, ``val.jsonl`` (from val_1) and ``val_2.jsonl``.
- DiDeMo: ``train_data.json``, ``val_data.json``, ``test_data.json``, each a list of
  ``{"video": file name, "description": sentence, "times": [[start, end], ...], ...}``, one item per
  description, ``times`` holding each annotator's segment pick in 5 s segment indices.
  They become ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``.

Output rows are the retrieval format of :func:`lfvila_model.data.annotations.read_retrieval_jsonl`:
``{"clip_id": id, "text": [sentence, ...]}``, one row per video, sentences stripped of surrounding whitespace
(empty ones dropped) and in time order:

- ActivityNet: by the start of each sentence's timestamp; ``clip_id`` is the annotation key (``v_<YouTube id>``).
- DiDeMo: by each description's earliest start over its annotators' ``times``; ``clip_id`` is the ``video``
  file name without its extension. Videos keep the order of their first description in the file.

Ties keep the order of the annotation file (a stable sort).

Videos are looked up in the raw folder, recursively, under any file extension (the common video extensions
first: :data:`VIDEO_EXTENSIONS`); ActivityNet ids are tried with and without their ``v_`` prefix, DiDeMo names
as written in ``video`` and as ``<clip_id>.<any extension>``. Each is re-encoded to ``<out>/videos/<clip_id>.mp4``
(:mod:`.transcode`). Rows whose video is missing or unreadable are left out of the jsonl files (the fine-tuning
and the evaluation need every video of their rows) and listed in ``<out>/report.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from .annotations import AnnotationError, write_jsonl
from ..jsonable import write_json

__all__ = ["DATASETS", "VIDEO_EXTENSIONS", "BenchmarkRow", "read_activitynet_captions", "read_didemo",
           "read_split_list", "parse_split_lists", "index_videos", "find_video", "prepare_benchmark"]

# the extensions tried first, in this order, when several files share a video's name
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".3gp", ".flv", ".mpg", ".mpeg")
# files in a download folder that are surely not videos (partial downloads, metadata, thumbnails)
_NOT_VIDEO = {".part", ".ytdl", ".tmp", ".json", ".txt", ".csv", ".md", ".html", ".jpg", ".jpeg", ".png", ".webp",
              ".description", ".vtt", ".srt"}


@dataclass(frozen=True)
class BenchmarkRow:
    """One video of a split: its ``clip_id``, its sentences in time order, the names its raw file may have
    (``raw_names``: file names or extension-less stems) and the ids a split list may give it (``list_ids``)."""

    clip_id: str
    sentences: tuple[str, ...]
    raw_names: tuple[str, ...]
    list_ids: tuple[str, ...]

    def to_json(self) -> dict:
        return {"clip_id": self.clip_id, "text": list(self.sentences)}


def _load_json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _number(v: Any, where: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AnnotationError(f"{where}: {what} must be a number, got {v!r:.60}")
    return float(v)


def _in_order(items: Sequence[tuple[float, str]]) -> tuple[str, ...]:
    """Sentences by start (stable), stripped, empty ones left out."""
    ordered = sorted(range(len(items)), key=lambda i: items[i][0])
    return tuple(s for s in (items[i][1].strip() for i in ordered) if s)


def _activitynet_ids(video_id: str) -> tuple[str, ...]:
    """The id with and without the ``v_`` prefix of the annotation keys (downloads and split lists use both)."""
    other = video_id[2:] if video_id.startswith("v_") else "v_" + video_id
    return (video_id, other)


def read_activitynet_captions(path: str | os.PathLike) -> list[BenchmarkRow]:
    """Rows of one ActivityNet Captions file (``{video_id: {"duration", "timestamps", "sentences"}}``), in the
    file's order; sentences ordered by timestamp start. A video without any non-blank sentence has no row."""
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{video_id: {{timestamps, sentences}}}}, got "
                              f"{type(data).__name__}")
    rows = []
    for vid, item in data.items():
        where = f"{path}[{vid!r}]"
        if not isinstance(item, dict) or "sentences" not in item or "timestamps" not in item:
            raise AnnotationError(f"{where}: expected an object with 'timestamps' and 'sentences', got "
                                  f"{item!r:.80}")
        sents, stamps = item["sentences"], item["timestamps"]
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise AnnotationError(f"{where}: 'sentences' must be a list of strings, got {sents!r:.80}")
        if not isinstance(stamps, list) or len(stamps) != len(sents):
            raise AnnotationError(f"{where}: 'timestamps' must be a list of one [start, end] per sentence "
                                  f"({len(sents)}), got {stamps!r:.80}")
        starts = []
        for i, ts in enumerate(stamps):
            if not isinstance(ts, (list, tuple)) or len(ts) != 2:
                raise AnnotationError(f"{where}: timestamps[{i}] must be [start, end], got {ts!r:.60}")
            starts.append(_number(ts[0], where, f"timestamps[{i}][0]"))
        sentences = _in_order(list(zip(starts, sents)))
        if sentences:
            ids = _activitynet_ids(vid)
            rows.append(BenchmarkRow(vid, sentences, ids, ids))
    return rows


def read_didemo(path: str | os.PathLike) -> list[BenchmarkRow]:
    """Rows of one DiDeMo file (a list of ``{"video", "description", "times"}``): one per video, in the order of
    its first description; descriptions ordered by their earliest annotator start. A video without any
    non-blank description has no row."""
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{video, description, times}}, got "
                              f"{type(data).__name__}")
    by_video: dict[str, list[tuple[float, str]]] = {}
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or not all(k in item for k in ("video", "description", "times")):
            raise AnnotationError(f"{where}: expected an object with 'video', 'description' and 'times', got "
                                  f"{item!r:.80}")
        video, text, times = item["video"], item["description"], item["times"]
        if not isinstance(video, str) or not video:
            raise AnnotationError(f"{where}: 'video' must be a non-empty file name, got {video!r:.60}")
        if not isinstance(text, str):
            raise AnnotationError(f"{where}: 'description' must be a string, got {text!r:.60}")
        if not isinstance(times, list) or not times:
            raise AnnotationError(f"{where}: 'times' must be a non-empty list of [start, end] segment picks, got "
                                  f"{times!r:.60}")
        starts = []
        for j, t in enumerate(times):
            if not isinstance(t, (list, tuple)) or len(t) != 2:
                raise AnnotationError(f"{where}: times[{j}] must be [start, end], got {t!r:.60}")
            starts.append(_number(t[0], where, f"times[{j}][0]"))
        by_video.setdefault(video, []).append((min(starts), text))
    rows = []
    seen: dict[str, str] = {}
    for video, items in by_video.items():
        clip_id = os.path.splitext(video)[0]
        if clip_id in seen:  # two file names differing only by extension would write one output
            raise AnnotationError(f"{path}: videos {seen[clip_id]!r} and {video!r} have the same clip_id "
                                  f"{clip_id!r}")
        seen[clip_id] = video
        sentences = _in_order(items)
        if sentences:
            rows.append(BenchmarkRow(clip_id, sentences, (video, clip_id), (clip_id, video)))
    return rows


# name -> (reader, ((split, annotation file), ...)); each split is written to <out>/<split>.jsonl
DATASETS = {
    "activitynet": (read_activitynet_captions, (("train", "train.json"), ("val", "val_1.json"),
                                                ("val_2", "val_2.json"))),
    "didemo": (read_didemo, (("train", "train_data.json"), ("val", "val_data.json"), ("test", "test_data.json"))),
}


# ----------------------------------------------------------------------------------------------------------------
# split lists


def read_split_list(path: str | os.PathLike) -> set[str]:
    """Video ids of a split list: one per line, surrounding whitespace stripped; blank lines and ``#`` comments
    skipped. An id written with a video extension (``x.mp4``) also counts without it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split list not found: {path}")
    ids = set()
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            ids.add(s)
            stem, ext = os.path.splitext(s)
            if ext.lower() in VIDEO_EXTENSIONS:
                ids.add(stem)
    return ids


def parse_split_lists(specs: Iterable[str], splits: Sequence[str]) -> dict[str, Optional[set[str]]]:
    """``["train=train_list.txt", "val=val_list.txt"]`` -> ``{split: ids or None (not restricted)}``.

    ``SPLIT=FILE`` restricts that split; a bare ``FILE`` restricts every split (each keeps its listed videos).
    Two lists for one split keep the videos of either.
    """
    out: dict[str, Optional[set[str]]] = {s: None for s in splits}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if sep and name not in out and not os.path.isfile(spec):
            raise ValueError(f"split list {spec!r}: no split {name!r} here (splits: {', '.join(out)}), and no "
                             f"file of that name")
        targets = [name] if sep and name in out else list(out)
        if not sep or name not in out:
            file = spec
        ids = read_split_list(file)
        for s in targets:
            out[s] = ids if out[s] is None else out[s] | ids
    return out


# ----------------------------------------------------------------------------------------------------------------
# finding the raw videos


def index_videos(raw_dir: str | os.PathLike) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(by file name, by stem)`` of the files under ``raw_dir`` (recursive, sorted walk: the first of two equal
    names wins). Stems map to every candidate, common video extensions first."""
    raw_dir = os.fspath(raw_dir)
    by_name: dict[str, str] = {}
    by_stem: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        for fn in sorted(files):
            if fn.startswith("."):
                continue
            path = os.path.join(root, fn)
            by_name.setdefault(fn, path)
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in _NOT_VIDEO:
                by_stem.setdefault(stem, []).append(path)

    def rank(p: str):
        ext = os.path.splitext(p)[1].lower()
        return VIDEO_EXTENSIONS.index(ext) if ext in VIDEO_EXTENSIONS else len(VIDEO_EXTENSIONS)

    for paths in by_stem.values():
        paths.sort(key=rank)  # stable: the walk order among equal ranks
    return by_name, by_stem


def find_video(index: tuple[dict[str, str], dict[str, list[str]]], names: Iterable[str]) -> Optional[str]:
    """The raw file of a video: a file named exactly as one of ``names``, else one whose name without its
    extension is one of them (common video extensions first); None when there is none."""
    by_name, by_stem = index
    names = list(names)
    for n in names:
        if n in by_name and os.path.splitext(n)[1].lower() not in _NOT_VIDEO:
            return by_name[n]
    for n in names:
        if n in by_stem:
            return by_stem[n][0]
    return None


# ----------------------------------------------------------------------------------------------------------------
# the whole preparation


def _check_options(out_dir: str, options: Mapping[str, Any]) -> None:
    """A folder already prepared with other re-encoding options would mix two kinds of videos: refuse."""
    path = os.path.join(out_dir, "report.json")
    videos = os.path.join(out_dir, "videos")
    if not os.path.isfile(path) or not os.path.isdir(videos) or not any(f.endswith(".mp4") for f in os.listdir(videos)):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return
    differ = {k: (before.get(k), v) for k, v in options.items() if k in before and before.get(k) != v}
    if differ:
        desc = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{out_dir} was prepared with other options ({desc}); its videos would not be redone. Use "
                         f"another --out, or delete {os.path.join(out_dir, 'videos')} to re-encode everything")


def prepare_benchmark(dataset: str, annotations_dir: str | os.PathLike, raw_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, *, fps: float = 3, short_side: Optional[int] = None,
                      max_seconds: Optional[float] = None, workers: Optional[int] = None,
                      split_lists: Iterable[str] = (), progress: bool = True) -> dict:
    """Converts a benchmark's annotations and re-encodes its videos (module docstring); resumable.

    Args:
        dataset: ``"activitynet"`` or ``"didemo"`` (:data:`DATASETS`).
        annotations_dir: the folder of the benchmark's annotation files (at least one must be there).
        raw_dir: the downloaded videos (searched recursively).
        out_dir: written: ``<split>.jsonl``, ``videos/<clip_id>.mp4``, ``report.json``.
        fps, short_side, max_seconds: re-encoding (:func:`.transcode.transcode_video`).
        workers: re-encoding processes (default: the CPUs available).
        split_lists: ``SPLIT=FILE`` or ``FILE`` specs (:func:`parse_split_lists`).
    Returns:
        The report (also written to ``<out>/report.json``): options, per split the rows written and the rows
        left out (not in the split list, missing video, unreadable video, no text), and every missing and
        unreadable video.
    """
    from .transcode import TranscodeJob, transcode_videos

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    reader, split_files = DATASETS[dataset]
    annotations_dir, raw_dir, out_dir = os.fspath(annotations_dir), os.fspath(raw_dir), os.fspath(out_dir)
    if not os.path.isdir(annotations_dir):
        raise FileNotFoundError(f"annotation folder not found: {annotations_dir}")
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"video folder not found: {raw_dir}")
    present = [(s, os.path.join(annotations_dir, f)) for s, f in split_files
               if os.path.isfile(os.path.join(annotations_dir, f))]
    if not present:
        raise FileNotFoundError(f"{annotations_dir} holds none of the {dataset} annotation files "
                                f"{[f for _, f in split_files]}")
    options = {"fps": fps, "short_side": short_side, "max_seconds": max_seconds}
    os.makedirs(out_dir, exist_ok=True)
    _check_options(out_dir, options)
    lists = parse_split_lists(split_lists, [s for s, _ in split_files])

    splits: dict[str, dict] = {}
    rows_by_split: dict[str, list[BenchmarkRow]] = {}
    matched: set[str] = set()  # ids of the rows the split lists kept
    for split, path in present:
        rows = reader(path)
        info = {"annotation_file": path, "videos_in_annotations": len(rows)}
        listed = lists[split]
        if listed is not None:
            kept = [r for r in rows if listed.intersection(r.list_ids)]
            matched.update(i for r in kept for i in r.list_ids)
            info["not_in_split_list"] = len(rows) - len(kept)
            rows = kept
        rows_by_split[split] = rows
        splits[split] = info
    listed_ids = set().union(*(v for v in lists.values() if v is not None))
    unknown = sorted(i for i in listed_ids if i not in matched and os.path.splitext(i)[0] not in matched)

    video_dir = os.path.join(out_dir, "videos")
    index = index_videos(raw_dir)
    jobs: dict[str, TranscodeJob] = {}
    kept_without_raw = 0  # encoded by an earlier run from a raw file that is gone since
    missing: set[str] = set()
    seen: set[str] = set()
    for rows in rows_by_split.values():
        for r in rows:
            if r.clip_id in seen:
                continue  # a video of several splits (ActivityNet val_1 / val_2) is encoded once
            seen.add(r.clip_id)
            dst = os.path.join(video_dir, r.clip_id + ".mp4")
            src = find_video(index, r.raw_names)
            if src is not None:
                jobs[r.clip_id] = TranscodeJob(src, dst)
            elif os.path.isfile(dst):
                kept_without_raw += 1
            else:
                missing.add(r.clip_id)
    result = transcode_videos(list(jobs.values()), fps=fps, short_side=short_side, max_seconds=max_seconds,
                              workers=workers, progress=progress, desc=f"re-encoding {dataset}")
    by_src = {j.src: cid for cid, j in jobs.items()}
    unreadable = {by_src[src]: {"path": src, "reason": reason} for src, reason in result.failed.items()}

    for split, rows in rows_by_split.items():
        info = splits[split]
        keep = [r for r in rows if os.path.isfile(os.path.join(video_dir, r.clip_id + ".mp4"))]
        info["dropped_missing_video"] = [r.clip_id for r in rows if r.clip_id in missing]
        info["dropped_unreadable_video"] = [r.clip_id for r in rows if r.clip_id in unreadable]
        info["rows"] = len(keep)
        jsonl = os.path.join(out_dir, f"{split}.jsonl")
        if keep:
            write_jsonl(jsonl, [r.to_json() for r in keep])
            info["jsonl"] = jsonl
        else:  # no file rather than an empty one, which training and evaluation would reject later
            if os.path.isfile(jsonl):
                os.remove(jsonl)
            info["jsonl"] = None

    report = {
        "dataset": dataset,
        "annotations": annotations_dir,
        "raw_videos": raw_dir,
        "out": out_dir,
        "video_root": video_dir,
        "options": options,
        "splits": splits,
        "split_list_ids_not_in_annotations": unknown,
        "videos": {"total": len(seen), "encoded_now": len(result.done),
                   "already_encoded": len(result.existing) + kept_without_raw,
                   "missing": len(missing), "unreadable": len(unreadable)},
        "missing": sorted(missing),
        "unreadable": dict(sorted(unreadable.items())),
        "note": "rows whose video is missing or unreadable are left out of the jsonl files (listed per split)",
    }
    write_json(os.path.join(out_dir, "report.json"), report)
    return report
