"""HD-VILA-100M metadata and transcripts into the pre-training set of LF-VILA (`lfvila prepare clips`; user guide:
docs/pretraining-at-scale.md).

Input:

- META, one video a line (the HD-VILA-100M metadata):
  ``{"video_id": "abc", "url": "...", "clip": [{"clip_id": "abc.3.mp4", "span": ["00:01:02.500", "00:01:15.000"]},
  ...]}``. A clip id is ``<video_id>.<n>.mp4``; ``n`` numbers the clips of the video in time order, and clips
  ``n`` and ``n + 1`` are consecutive. Spans are ``hh:mm:ss.fff`` strings (``mm:ss`` and plain seconds too).
- TEXT, one clip a line: ``{"clip_id": "abc.3.mp4", "text": "the ASR sentence"}``.
- RAW_DIR: the downloaded videos, ``<video_id>.<ext>`` in any container PyAV opens (searched recursively).

A LF-VILA-8M sample is a run of consecutive clips of one video with one sentence each. Here a sample is each
maximal run of at least ``min_clips`` consecutive clip numbers whose clips all have a (non-blank) text and were
cut. Only the clips of such runs (judged from META and TEXT) are cut, each by its span, frame-accurately, and
re-encoded at ``fps`` (and ``short_side``) to ``<out>/clips/<video_id>/<clip_id>``, the layout
:func:`.annotations.clip_video_path` reads (:mod:`.transcode`: parallel, resumable, a bad video never fatal). A clip
that cannot be cut splits its run; what is left of the run is kept where it still has ``min_clips`` clips.

Output in ``<out>``: ``clips/``, ``pretrain.jsonl`` (one sample a line, ``[{"clip_id", "text"}, ...]``, the format
of :func:`.annotations.read_pretrain_jsonl`; samples in META order, then by first clip) and ``report.json``
(options, counts, missing and unreadable videos, clips that could not be cut, malformed clip entries).

A malformed line (not JSON, no ``video_id`` or clip list) stops the run with its file and line; a malformed clip
entry (an id not of its video, a bad span, a repeated id) is skipped and listed in the report.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from .annotations import AnnotationError, clip_video_path, write_jsonl
from .benchmarks import find_video, index_videos
from ..jsonable import write_json

__all__ = ["HdvilaClip", "HdvilaVideo", "parse_timestamp", "parse_clip_id", "read_hdvila_meta", "read_transcripts",
           "consecutive_runs", "prepare_clips"]

_TIMESTAMP = re.compile(r"^\s*(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?)\s*$")  # [[hh:]mm:]ss[.fff]


@dataclass(frozen=True)
class HdvilaClip:
    """One clip of the metadata: its id, its number ``n`` (from ``<video_id>.<n>.mp4``) and span in seconds."""

    clip_id: str
    number: int
    start: float
    end: float


@dataclass(frozen=True)
class HdvilaVideo:
    """One metadata line: the video id and its well-formed clips (in file order); ``bad_clips`` ``{clip id or
    "<video_id>#<index>": reason}`` of the entries skipped."""

    video_id: str
    clips: tuple[HdvilaClip, ...]
    bad_clips: dict


def parse_timestamp(value: Any) -> float:
    """Seconds of a span bound: ``"hh:mm:ss.fff"``, ``"mm:ss.f"``, ``"ss.fff"`` or a number >= 0.

    Example: ``parse_timestamp("00:01:02.500") == 62.5``. Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"a timestamp must be 'hh:mm:ss.fff' or seconds, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a timestamp must be >= 0, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"a timestamp must be 'hh:mm:ss.fff' or seconds, got {type(value).__name__} {value!r:.40}")
    m = _TIMESTAMP.match(value)
    if m is None:
        raise ValueError(f"a timestamp must be 'hh:mm:ss.fff', got {value!r:.40}")
    h, mi, sec = m.groups()
    if (h is not None or mi is not None) and float(sec) >= 60:
        raise ValueError(f"seconds must be below 60 in {value!r}")
    if h is not None and int(mi) >= 60:
        raise ValueError(f"minutes must be below 60 in {value!r}")
    return int(h or 0) * 3600.0 + int(mi or 0) * 60.0 + float(sec)


def parse_clip_id(clip_id: Any) -> tuple[str, int]:
    """``(video_id, n)`` of a clip id ``<video_id>.<n>.mp4``; ValueError when it has another form.

    The video id is everything before the first ``.`` (the clip folder :func:`.annotations.clip_video_path` uses),
    so it cannot hold a dot itself.
    """
    if not isinstance(clip_id, str):
        raise ValueError(f"a clip_id must be a string, got {type(clip_id).__name__}")
    parts = clip_id.split(".")
    if len(parts) != 3 or not parts[0] or parts[2] != "mp4" or not parts[1].isdigit() or "/" in clip_id:
        raise ValueError(f"a clip_id must be '<video_id>.<n>.mp4', got {clip_id!r:.80}")
    return parts[0], int(parts[1])


def _iter_json_lines(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{where}: not valid JSON ({e})") from None


def _check_file(name: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} file not found: {path}")
    return path


def _parse_video(obj: Any, where: str) -> HdvilaVideo:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    vid = obj.get("video_id")
    if not isinstance(vid, str) or not vid:
        raise AnnotationError(f"{where}: 'video_id' must be a non-empty string, got {vid!r:.60}")
    entries = obj.get("clip")
    if not isinstance(entries, list):
        raise AnnotationError(f"{where}: 'clip' must be a list of {{clip_id, span}} objects, got "
                              f"{type(entries).__name__}")
    clips, bad, seen = [], {}, set()
    for i, c in enumerate(entries):
        cid = c.get("clip_id") if isinstance(c, dict) else None
        name = cid if isinstance(cid, str) and cid else f"{vid}#{i}"
        try:
            if not isinstance(c, dict):
                raise ValueError(f"expected a {{clip_id, span}} object, got {type(c).__name__}")
            owner, n = parse_clip_id(cid)
            if owner != vid:
                raise ValueError(f"clip_id is not of video {vid!r}")
            span = c.get("span")
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise ValueError(f"'span' must be [start, end], got {span!r:.60}")
            start, end = parse_timestamp(span[0]), parse_timestamp(span[1])
            if end <= start:
                raise ValueError(f"span end {span[1]!r} is not after its start {span[0]!r}")
            if cid in seen:
                raise ValueError("clip_id repeated in the video (the first entry is kept)")
        except ValueError as e:
            bad[name if name not in bad else f"{name}#{i}"] = str(e)
            continue
        seen.add(cid)
        clips.append(HdvilaClip(cid, n, start, end))
    return HdvilaVideo(vid, tuple(clips), bad)


def read_hdvila_meta(path: str | os.PathLike) -> list[HdvilaVideo]:
    """Reads META (module docstring): one :class:`HdvilaVideo` per line, malformed clip entries set aside.

    Raises:
        AnnotationError: ``<path>:<line>:`` a line that is not JSON, or lacks ``video_id`` or the ``clip`` list,
            or a video id given twice.
    """
    path = _check_file("meta", path)
    out, lines = [], {}
    for where, obj in _iter_json_lines(path):
        v = _parse_video(obj, where)
        if v.video_id in lines:
            raise AnnotationError(f"{where}: video_id {v.video_id!r} already given at line {lines[v.video_id]}")
        lines[v.video_id] = where.rsplit(":", 1)[1]
        out.append(v)
    return out


def read_transcripts(path: str | os.PathLike, wanted: Optional[set] = None) -> tuple[dict, int]:
    """Reads TEXT: ``({clip_id: text}, lines left out)``, text stripped of surrounding whitespace.

    Only clip ids in ``wanted`` are kept (None: all), so the whole HD-VILA transcript file need not fit in memory.
    A repeated clip id keeps its first text. Raises AnnotationError for a line that is not a ``{clip_id, text}``
    object with string values.
    """
    path = _check_file("transcripts", path)
    texts: dict[str, str] = {}
    left_out = 0
    for where, obj in _iter_json_lines(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("clip_id"), str) or not isinstance(obj.get("text"),
                                                                                                   str):
            raise AnnotationError(f"{where}: expected {{\"clip_id\": str, \"text\": str}}, got {str(obj):.80}")
        cid = obj["clip_id"]
        if (wanted is not None and cid not in wanted) or cid in texts:
            left_out += 1
            continue
        texts[cid] = obj["text"].strip()
    return texts, left_out


def consecutive_runs(numbers: Iterable[int], min_clips: int) -> list[list[int]]:
    """The maximal runs of consecutive integers in ``numbers`` with at least ``min_clips`` members, in order.

    Example: ``consecutive_runs([0, 1, 2, 3, 5, 6, 7, 8, 9, 11], 4) == [[0, 1, 2, 3], [5, 6, 7, 8, 9]]``.
    """
    runs, cur = [], []
    for n in sorted(set(numbers)):
        if cur and n != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(n)
    if cur:
        runs.append(cur)
    return [r for r in runs if len(r) >= min_clips]


def _check_reencoding(out_dir: str, options: dict) -> None:
    """Clips cut with other re-encoding options would not be redone and the set would mix two kinds: refuse."""
    path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(out_dir, "clips")):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return
    differ = {k: (before[k], options[k]) for k in ("fps", "short_side") if k in before and before[k] != options[k]}
    if differ:
        desc = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{out_dir} holds clips cut with other options ({desc}); they would not be redone. Use "
                         f"another --out, or delete {os.path.join(out_dir, 'clips')} to cut everything again")


def prepare_clips(meta: str | os.PathLike, transcripts: str | os.PathLike, raw_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, *, fps: float = 3, short_side: Optional[int] = None,
                  min_clips: int = 4, workers: Optional[int] = None, progress: bool = True) -> dict:
    """Cuts the clips of the pre-training samples and writes ``pretrain.jsonl`` (module docstring); resumable.

    Args:
        meta: the HD-VILA-100M metadata jsonl (META).
        transcripts: the ``{clip_id, text}`` jsonl (TEXT).
        raw_dir: the downloaded videos ``<video_id>.<ext>`` (searched recursively).
        out_dir: written: ``clips/<video_id>/<clip_id>``, ``pretrain.jsonl`` (absent when no sample is left),
            ``report.json``.
        fps, short_side: re-encoding (:func:`.transcode.transcode_video`); a folder holding clips cut with other
            values is refused (ValueError).
        min_clips: the fewest consecutive clips a sample has (>= 1; LF-VILA: 4).
        workers: processes cutting clips (default: the CPUs available); 1 cuts in this process.
        progress: show the progress bar.
    Returns:
        The report, also written to ``<out>/report.json``.
    """
    from .transcode import TranscodeJob, output_size, transcode_videos

    if isinstance(min_clips, bool) or not isinstance(min_clips, int) or min_clips < 1:
        raise ValueError(f"min_clips must be an integer >= 1, got {min_clips!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if short_side is not None:
        output_size(2, 2, short_side)  # raises ValueError naming short_side
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    meta, transcripts = _check_file("meta (the metadata)", meta), _check_file("transcripts", transcripts)
    raw_dir, out_dir = os.fspath(raw_dir), os.fspath(out_dir)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"raw_dir (the video folder) not found: {raw_dir}")
    options = {"fps": float(fps), "short_side": short_side, "min_clips": min_clips}
    os.makedirs(out_dir, exist_ok=True)
    _check_reencoding(out_dir, options)
    clip_root = os.path.join(out_dir, "clips")

    videos = read_hdvila_meta(meta)
    texts, texts_left_out = read_transcripts(transcripts, {c.clip_id for v in videos for c in v.clips})

    # the clips that can belong to a sample, judged from META and TEXT alone
    candidates: dict[str, list[HdvilaClip]] = {}
    for v in videos:
        with_text = {c.number: c for c in v.clips if texts.get(c.clip_id)}
        runs = consecutive_runs(with_text, min_clips)
        if runs:
            candidates[v.video_id] = [with_text[n] for r in runs for n in r]

    index = index_videos(raw_dir)
    jobs: list[TranscodeJob] = []
    job_clip: dict[str, tuple[str, str]] = {}  # dst -> (video_id, clip_id)
    raw_of: dict[str, str] = {}
    missing_videos: list[str] = []
    kept_without_raw = 0  # cut by an earlier run from a raw file that is gone since
    for vid, clips in candidates.items():
        src = find_video(index, [vid])
        if src is not None:
            raw_of[vid] = src
        absent = 0
        for c in clips:
            dst = clip_video_path(clip_root, c.clip_id)
            if src is not None:
                jobs.append(TranscodeJob(src, dst, c.start, c.end))
                job_clip[os.path.abspath(dst)] = (vid, c.clip_id)
            elif os.path.isfile(dst):
                kept_without_raw += 1
            else:
                absent += 1
        if src is None and absent:
            missing_videos.append(vid)
    result = transcode_videos(jobs, fps=fps, short_side=short_side, workers=workers, progress=progress,
                              desc="cutting clips", unit="clip")

    failed_by_video: dict[str, dict[str, str]] = {}
    for dst, reason in result.failed_outputs.items():
        vid, cid = job_clip[os.path.abspath(dst)]
        failed_by_video.setdefault(vid, {})[cid] = reason
    unreadable_videos, unreadable_clips = {}, {}
    for vid, failed in failed_by_video.items():
        if len(failed) == len(candidates[vid]):  # nothing of it could be cut: the video, not its spans
            unreadable_videos[vid] = {"path": raw_of[vid], "reason": next(iter(failed.values()))}
        else:
            unreadable_clips.update(failed)

    samples = []
    for v in videos:
        cut = {c.number: c for c in candidates.get(v.video_id, ())
               if os.path.isfile(clip_video_path(clip_root, c.clip_id))}
        for run in consecutive_runs(cut, min_clips):
            samples.append([{"clip_id": cut[n].clip_id, "text": texts[cut[n].clip_id]} for n in run])
    jsonl = os.path.join(out_dir, "pretrain.jsonl")
    if samples:
        write_jsonl(jsonl, samples)
    elif os.path.isfile(jsonl):  # no file rather than an empty one, which the datasets would reject later
        os.remove(jsonl)

    lengths = [len(s) for s in samples]
    clips_in_meta = sum(len(v.clips) for v in videos)
    report = {
        "meta": meta,
        "transcripts": transcripts,
        "raw_videos": raw_dir,
        "out": out_dir,
        "clip_root": clip_root,
        "pretrain_jsonl": jsonl if samples else None,
        "options": options,
        "videos": {"in_meta": len(videos), "with_candidate_runs": len(candidates), "missing": len(missing_videos),
                   "unreadable": len(unreadable_videos),
                   "in_samples": len({s[0]["clip_id"].split(".", 1)[0] for s in samples})},
        "clips": {"in_meta": clips_in_meta, "malformed": sum(len(v.bad_clips) for v in videos),
                  "with_text": sum(1 for v in videos for c in v.clips if texts.get(c.clip_id)),
                  "in_candidate_runs": sum(len(c) for c in candidates.values()),
                  "cut_now": len(result.done), "already_cut": len(result.existing) + kept_without_raw,
                  "failed": len(result.failed_outputs), "in_samples": sum(lengths)},
        "transcript_lines_left_out": texts_left_out,
        "samples": len(samples),
        "clips_per_sample": ({"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 3)}
                             if lengths else None),
        "missing_videos": sorted(missing_videos),
        "unreadable_videos": dict(sorted(unreadable_videos.items())),
        "unreadable_clips": dict(sorted(unreadable_clips.items())),
        "malformed_clips": {k: r for v in videos for k, r in v.bad_clips.items()},
        "note": "a sample is a maximal run of >= min_clips consecutive clip numbers of one video that all have a "
                "text and were cut; missing and unreadable videos and the clips that could not be cut are left out",
    }
    write_json(os.path.join(out_dir, "report.json"), report)
    return report
