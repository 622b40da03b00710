"""Readers for the official LF-VILA annotation formats (spec section 5), returning typed records.

Every reader checks each record and raises :class:`AnnotationError` (a ``ValueError``) naming the file and the
1-based line of the first malformed record, so a bad line in a million-line file is found at once. Blank lines
are skipped (the official jsonl files end with a newline). Nothing is ever unpickled: the LMDB values of the
pre-training set are Python-literal strings and are parsed with :func:`ast.literal_eval`.

Formats (one JSON object or list per line):

- pre-training: ``[{"clip_id": "vid.3.mp4", "text": "..."}, ...]`` (consecutive clips of one video);
  the LMDB value is the Python-literal string of the same list (``"[{'clip_id': ..., 'text': ...}]"``).
- retrieval: ``{"clip_id": "<video id>", "text": ["sentence", ...] | "sentence"}``.
- How2QA: ``{"clip_id", "span": [start_s, end_s], "text_q", "text_a": [4 answers],
  "text_s": [{"text", "start", "end"}, ...], "answer_idx"}``.
- VIOLIN: ``{"clip_id", "text_q", "text_s": [{"text", "start", "end"}], "answer": 0 | 1}``.
- ActivityNet-QA: ``{"video_name", "question", "answer": class id}``.
- classification (COIN, LVU): ``{"video_id", "recipe_type": class id}`` (the label key is configurable).
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "AnnotationError",
    "ClipText",
    "PretrainSample",
    "RetrievalRecord",
    "Subtitle",
    "How2QARecord",
    "ViolinRecord",
    "ActivityNetQARecord",
    "ClassificationRecord",
    "parse_pretrain_value",
    "read_pretrain_jsonl",
    "read_pretrain_lmdb",
    "read_retrieval_jsonl",
    "read_how2qa_jsonl",
    "read_violin_jsonl",
    "read_activitynet_qa_jsonl",
    "read_classification_jsonl",
    "write_jsonl",
    "clip_video_path",
    "retrieval_video_path",
]


class AnnotationError(ValueError):
    """A malformed annotation record; the message starts with ``<file>:<line>:`` (or ``<file>[key]:`` for LMDB)."""


# ----------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class ClipText:
    """One pre-training clip: its id (``<video>.<n>.mp4``) and its transcript sentence."""

    clip_id: str
    text: str


@dataclass(frozen=True)
class PretrainSample:
    """Consecutive clips of one video, in temporal order (clip m <-> sentence m for MTC)."""

    clips: tuple[ClipText, ...]


@dataclass(frozen=True)
class RetrievalRecord:
    """A paragraph-to-video retrieval pair: video id (file ``<clip_id>.mp4``) and its sentences in order.

    A ``text`` given as one string is one sentence (Condensed Movies uses M = 1).
    """

    clip_id: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class Subtitle:
    """A subtitle line with its start and end time in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class How2QARecord:
    clip_id: str
    span: tuple[float, float]  # question span in seconds
    question: str
    answers: tuple[str, ...]  # the 4 candidates
    subtitles: tuple[Subtitle, ...]
    answer_idx: int


@dataclass(frozen=True)
class ViolinRecord:
    clip_id: str
    statement: str  # ``text_q``
    subtitles: tuple[Subtitle, ...]
    label: int  # ``answer``: 1 if the statement is true of the video


@dataclass(frozen=True)
class ActivityNetQARecord:
    video_name: str
    question: str
    answer: int  # class id among the answer vocabulary


@dataclass(frozen=True)
class ClassificationRecord:
    video_id: str
    label: int


# ----------------------------------------------------------------------------------------------------------------
# field checks (each raises AnnotationError with the location prefix)


def _fail(where: str, msg: str) -> None:
    raise AnnotationError(f"{where}: {msg}")


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        _fail(where, f"missing key {key!r} (keys present: {sorted(obj)})")
    return obj[key]


def _str(obj: Any, key: str, where: str, *, allow_empty: bool = True) -> str:
    v = _field(obj, key, where)
    if not isinstance(v, str):
        _fail(where, f"{key!r} must be a string, got {type(v).__name__} {v!r:.60}")
    if not allow_empty and not v:
        _fail(where, f"{key!r} must be a non-empty string")
    return v


def _int(obj: Any, key: str, where: str) -> int:
    v = _field(obj, key, where)
    # bool is an int subclass; a label of `true` is a format error, not class 1
    if isinstance(v, bool) or not isinstance(v, int):
        # some exports write integral labels as floats (3.0) or strings ("3"); accept those exactly
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        _fail(where, f"{key!r} must be an integer, got {type(v).__name__} {v!r:.60}")
    return v


def _num(v: Any, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, f"{name} must be a number, got {type(v).__name__} {v!r:.60}")
    return float(v)


def _subtitles(obj: Any, key: str, where: str) -> tuple[Subtitle, ...]:
    v = _field(obj, key, where)
    if not isinstance(v, list):
        _fail(where, f"{key!r} must be a list of {{text, start, end}} objects, got {type(v).__name__}")
    out = []
    for i, s in enumerate(v):
        w = f"{where}: {key}[{i}]"
        out.append(Subtitle(_str(s, "text", w), _num(_field(s, "start", w), "start", w),
                            _num(_field(s, "end", w), "end", w)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# generic jsonl iteration


def _check_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    return path


def _iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yields ``(location, parsed JSON value)`` for each non-blank line; location is ``<path>:<line>``."""
    path = _check_path(path)
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read(path: str | os.PathLike, parse: Callable[[Any, str], Any]) -> list:
    return [parse(obj, where) for where, obj in _iter_jsonl(path)]


# ----------------------------------------------------------------------------------------------------------------
# pre-training


def _parse_pretrain(obj: Any, where: str) -> PretrainSample:
    if not isinstance(obj, list):
        _fail(where, f"a pre-training item must be a list of {{clip_id, text}} objects, got {type(obj).__name__}")
    if not obj:
        _fail(where, "a pre-training item must contain at least one clip, got an empty list")
    clips = []
    for i, c in enumerate(obj):
        w = f"{where}: clip {i}"
        clips.append(ClipText(_str(c, "clip_id", w, allow_empty=False), _str(c, "text", w)))
    return PretrainSample(tuple(clips))


def parse_pretrain_value(value: bytes | str, where: str = "<value>") -> PretrainSample:
    """Parses one LMDB value of the pre-training set: the Python-literal string of a list of clip dicts.

    ``ast.literal_eval`` accepts only literals, so a value can never run code (no pickle, no eval).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{where}: value is not UTF-8 ({e})") from None
    if not isinstance(value, str):
        raise TypeError(f"value must be bytes or str, got {type(value).__name__}")
    try:
        obj = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise AnnotationError(f"{where}: not a Python literal ({type(e).__name__}: {e})") from None
    return _parse_pretrain(obj, where)


def read_pretrain_jsonl(path: str | os.PathLike) -> list[PretrainSample]:
    """Reads a pre-training jsonl file (one list of consecutive ``{clip_id, text}`` per line)."""
    return _read(path, _parse_pretrain)


def read_pretrain_lmdb(path: str | os.PathLike, limit: int | None = None) -> list[PretrainSample]:
    """Reads the official pre-training LMDB (key ``str(index)``, value = Python-literal list of clips).

    The ``lmdb`` package is optional: it is imported here only, with a clear error when absent.
    """
    try:
        import lmdb  # type: ignore
    except ImportError:
        raise ImportError("reading the pre-training LMDB needs the optional 'lmdb' package (pip install lmdb); "
                          "jsonl files need nothing extra") from None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LMDB not found: {path}")
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    out = []
    try:
        with env.begin() as txn:
            n = txn.stat()["entries"] if limit is None else limit
            for i in range(n):
                v = txn.get(str(i).encode())
                if v is None:
                    raise AnnotationError(f"{path}[{i}]: key {str(i)!r} missing (keys must be 0..N-1)")
                out.append(parse_pretrain_value(v, f"{path}[{i}]"))
    finally:
        env.close()
    return out


def clip_video_path(video_root: str | os.PathLike, clip_id: str) -> str:
    """Path of a pre-training clip: ``<video_root>/<clip_id up to the first '.'>/<clip_id>`` (spec 5)."""
    return os.path.join(os.fspath(video_root), clip_id.split(".", 1)[0], clip_id)


def retrieval_video_path(video_root: str | os.PathLike, clip_id: str, ext: str = ".mp4") -> str:
    """Path of a downstream video: ``<video_root>/<clip_id>.mp4`` (spec 5)."""
    return os.path.join(os.fspath(video_root), clip_id + ext)


# ----------------------------------------------------------------------------------------------------------------
# downstream


def _parse_retrieval(obj: Any, where: str) -> RetrievalRecord:
    clip_id = _str(obj, "clip_id", where, allow_empty=False)
    text = _field(obj, "text", where)
    if isinstance(text, str):
        sentences = (text,)
    elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        sentences = tuple(text)
    else:
        _fail(where, f"'text' must be a string or a non-empty list of strings, got {text!r:.80}")
    return RetrievalRecord(clip_id, sentences)


def read_retrieval_jsonl(path: str | os.PathLike) -> list[RetrievalRecord]:
    """Reads a paragraph-to-video retrieval jsonl (``{clip_id, text: [...] | str}`` per line)."""
    return _read(path, _parse_retrieval)


def _parse_how2qa(obj: Any, where: str) -> How2QARecord:
    span = _field(obj, "span", where)
    if not (isinstance(span, list) and len(span) == 2):
        _fail(where, f"'span' must be [start_s, end_s], got {span!r:.60}")
    span = (_num(span[0], "span[0]", where), _num(span[1], "span[1]", where))
    answers = _field(obj, "text_a", where)
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        _fail(where, f"'text_a' must be a non-empty list of answer strings, got {answers!r:.80}")
    idx = _int(obj, "answer_idx", where)
    if not 0 <= idx < len(answers):
        _fail(where, f"'answer_idx' must be in [0, {len(answers)}), got {idx}")
    return How2QARecord(_str(obj, "clip_id", where, allow_empty=False), span, _str(obj, "text_q", where),
                        tuple(answers), _subtitles(obj, "text_s", where), idx)


def read_how2qa_jsonl(path: str | os.PathLike) -> list[How2QARecord]:
    """Reads How2QA (multiple choice with a question span and subtitles)."""
    return _read(path, _parse_how2qa)


def _parse_violin(obj: Any, where: str) -> ViolinRecord:
    label = _int(obj, "answer", where)
    if label not in (0, 1):
        _fail(where, f"'answer' must be 0 or 1, got {label}")
    return ViolinRecord(_str(obj, "clip_id", where, allow_empty=False), _str(obj, "text_q", where),
                        _subtitles(obj, "text_s", where), label)


def read_violin_jsonl(path: str | os.PathLike) -> list[ViolinRecord]:
    """Reads VIOLIN (statement true/false with subtitles)."""
    return _read(path, _parse_violin)


def _parse_actnet_qa(obj: Any, where: str) -> ActivityNetQARecord:
    answer = _int(obj, "answer", where)
    if answer < 0:
        _fail(where, f"'answer' must be a class id >= 0, got {answer}")
    return ActivityNetQARecord(_str(obj, "video_name", where, allow_empty=False), _str(obj, "question", where),
                               answer)


def read_activitynet_qa_jsonl(path: str | os.PathLike) -> list[ActivityNetQARecord]:
    """Reads ActivityNet-QA (open-ended QA cast as classification over the answer vocabulary)."""
    return _read(path, _parse_actnet_qa)


def read_classification_jsonl(path: str | os.PathLike, label_key: str = "recipe_type",
                              id_key: str = "video_id") -> list[ClassificationRecord]:
    """Reads a video classification jsonl (``{video_id, recipe_type}`` for COIN; keys configurable)."""
    if not isinstance(label_key, str) or not isinstance(id_key, str):
        raise TypeError(f"label_key and id_key must be strings, got {label_key!r}, {id_key!r}")

    def parse(obj: Any, where: str) -> ClassificationRecord:
        label = _int(obj, label_key, where)
        if label < 0:
            _fail(where, f"{label_key!r} must be a class id >= 0, got {label}")
        return ClassificationRecord(_str(obj, id_key, where, allow_empty=False), label)

    return _read(path, parse)


# ----------------------------------------------------------------------------------------------------------------
# writing (used by the demo generator; deterministic bytes: sorted nothing, fixed separators, '\n' endings)


def write_jsonl(path: str | os.PathLike, rows: Sequence[Any]) -> None:
    """Writes one JSON value per line, atomically (temporary file then rename), with stable formatting."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)
