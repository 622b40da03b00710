"""The pre-training set as WebDataset tar shards (`lfvila shard`; user guide: docs/pretraining-at-scale.md): the
format (version 1) and its writer. The streaming reader (``data.kind: shards``) lives in its own module and takes
the format's names from here.

Format, in one folder:

- ``shard-000000.tar``, ``shard-000001.tar``, ... (:data:`SHARD_NAME`), plain tar files written with the
  ``webdataset`` library. Shard ``i`` holds the written samples ``i * samples_per_shard`` to ``(i + 1) *
  samples_per_shard - 1`` in the order of the annotation file (the last shard may hold fewer).
- ``index.json`` (:data:`INDEX_FILE`): ``{"format": "lfvila-shards", "version": 1, "total": N, "shards":
  [{"name": "shard-000000.tar", "samples": n, "bytes": b}, ...], ...}``; readers ignore keys they do not know
  (the writer adds ``samples_per_shard`` and ``skipped``). Written last: a folder without it is not a finished
  set.
- One sample per pre-training sample (a run of consecutive clips of one video). Its ``__key__`` is
  :func:`sample_key` ``(n) = f"s{n:09d}"`` with ``n`` its 0-based line number in the annotation file (no dot:
  webdataset splits a member name at its first dot): the index ``PretrainDataset`` gives the same sample, so the
  reader draws the same window, frames and crop for it. A sample the writer skips leaves its number unused (keys
  rise but may have gaps; ``total`` counts the samples written). Its members are ``<key>.json``
  (:data:`JSON_MEMBER`): ``{"video_id": str, "clips": [clip_id, ...], "texts": [sentence, ...]}``, one sentence per
  clip in the same order, and ``<key>.clip000.mp4``, ``<key>.clip001.mp4``, ... (:func:`clip_member`): each
  clip's mp4 bytes, in order.

Nothing in a shard or the index names a path outside the folder, so a set can be moved or served from anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from .annotations import clip_video_path, read_pretrain_jsonl
from ..jsonable import write_json

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "INDEX_FILE", "SHARD_NAME", "SHARD_NAME_RE", "JSON_MEMBER",
           "CLIP_MEMBER_RE", "MAX_CLIPS", "shard_name", "sample_key", "clip_member", "read_index", "write_shards"]

FORMAT_NAME = "lfvila-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:06d}.tar"  # SHARD_NAME.format(i)
SHARD_NAME_RE = re.compile(r"^shard-(\d{6,})\.tar$")
JSON_MEMBER = "json"
CLIP_MEMBER_RE = re.compile(r"^clip(\d{3})\.mp4$")  # the member extension of clip m, m = int(group 1)
MAX_CLIPS = 1000  # clip members are numbered with three digits
# fixed tar member metadata: the same input gives byte-identical shards
_TAR_OPTIONS = {"user": "lfvila", "group": "lfvila", "mode": 0o444, "mtime": 0.0, "encoder": False}


def shard_name(i: int) -> str:
    """File name of shard ``i``: ``shard_name(3) == "shard-000003.tar"``."""
    return SHARD_NAME.format(i)


def sample_key(n: int) -> str:
    """``__key__`` of the set's sample ``n``: ``sample_key(12) == "s000000012"``."""
    return f"s{n:09d}"


def clip_member(m: int) -> str:
    """Member extension of a sample's clip ``m``: ``clip_member(2) == "clip002.mp4"``."""
    if not 0 <= m < MAX_CLIPS:
        raise ValueError(f"clip number must be in [0, {MAX_CLIPS}), got {m}")
    return f"clip{m:03d}.mp4"


def read_index(path: str | os.PathLike) -> dict:
    """Reads and checks a shard set's ``index.json`` (``path``: the folder or the file itself).

    Returns the index with ``"dir"`` added (the folder holding it). Raises FileNotFoundError when it is absent
    and ValueError when it is not a version-1 ``lfvila-shards`` index or its counts disagree.
    """
    path = os.fspath(path)
    index_path = os.path.join(path, INDEX_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"shard index not found: {index_path} (written by `lfvila shard` when it finishes)")
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise ValueError(f"{index_path}: not a {FORMAT_NAME} index (format "
                         f"{index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{index_path}: format version {index.get('version')!r}, this code reads {FORMAT_VERSION}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and SHARD_NAME_RE.match(str(s.get("name")))
                                                and isinstance(s.get("samples"), int) for s in shards):
        raise ValueError(f"{index_path}: 'shards' must be a list of {{name, samples, bytes}}")
    if sum(s["samples"] for s in shards) != index.get("total"):
        raise ValueError(f"{index_path}: total {index.get('total')!r} is not the sum of the shards' samples "
                         f"({sum(s['samples'] for s in shards)})")
    index["dir"] = os.path.dirname(os.path.abspath(index_path))
    return index


def _import_webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ImportError(f"writing shards needs the webdataset package (pip install webdataset): {e}") from None
    return webdataset


def _verify_shard(path: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    """Reads ``path`` back with webdataset: the samples' keys in order, their members and the bytes' digests."""
    wds = _import_webdataset()
    got = []
    for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
        members = {k: hashlib.sha1(v).hexdigest() for k, v in sample.items() if not k.startswith("__")}
        got.append((sample["__key__"], members))
    if len(got) != len(expected):
        raise RuntimeError(f"shard {path} reads back {len(got)} samples, {len(expected)} were written")
    for (key, members), (want_key, want) in zip(got, expected):
        if key != want_key or members != want:
            bad = sorted(k for k in set(members) | set(want) if members.get(k) != want.get(k))
            raise RuntimeError(f"shard {path}: sample {want_key} reads back wrong (key {key!r}, members {bad})")


class _ShardSink:
    """Writes samples to numbered shards: each under a temporary name, read back and checked, then renamed."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        self.out_dir, self.per_shard = out_dir, samples_per_shard
        self.shards: list[dict] = []
        self.writer = None
        self.expected: list[tuple[str, dict[str, str]]] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self.writer is None:
            wds = _import_webdataset()
            self.tmp = os.path.join(self.out_dir, f".{shard_name(len(self.shards))}.tmp{os.getpid()}")
            self.writer = wds.TarWriter(self.tmp, **_TAR_OPTIONS)
        self.writer.write({"__key__": key, **members})
        self.expected.append((key, {k: hashlib.sha1(v).hexdigest() for k, v in members.items()}))
        if len(self.expected) == self.per_shard:
            self.finish()

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        _verify_shard(self.tmp, self.expected)
        name = shard_name(len(self.shards))
        os.replace(self.tmp, os.path.join(self.out_dir, name))
        self.shards.append({"name": name, "samples": len(self.expected),
                            "bytes": os.path.getsize(os.path.join(self.out_dir, name))})
        self.expected = []

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 (the error that got us here matters)
                pass
            self.writer = None
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def write_shards(annotations: str | os.PathLike, video_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                 samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Packs the samples of a pre-training jsonl and their clip files into tar shards (module docstring).

    Args:
        annotations: ``pretrain.jsonl`` (:func:`.annotations.read_pretrain_jsonl`), e.g. from `lfvila prepare
            clips`.
        video_root: the clip folder: clip ``c`` is read from ``<video_root>/<c up to its first '.'>/<c>``.
        out_dir: the shard folder (created). Shards and an index already there are replaced.
        samples_per_shard: samples per shard (the last may hold fewer).
        progress: show the progress bar.
    Returns:
        The index (also ``<out>/index.json``) with ``"report"``: the samples skipped ``[{"line", "clips",
        "reason"}]`` (a clip file missing or empty; also in ``<out>/report.json``), not fatal.
    Raises:
        RuntimeError: a written shard that does not read back as written (a disk or library fault).
    """
    from tqdm.auto import tqdm

    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    annotations, video_root, out_dir = os.fspath(annotations), os.fspath(video_root), os.fspath(out_dir)
    if not os.path.isdir(video_root):
        raise FileNotFoundError(f"video_root (the clip folder) not found: {video_root}")
    samples = read_pretrain_jsonl(annotations)
    _import_webdataset()  # before any file is touched
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(index_path):  # the set is unfinished until the new index is written
        os.remove(index_path)

    sink = _ShardSink(out_dir, samples_per_shard)
    skipped: list[dict] = []
    total = 0
    bar = tqdm(samples, desc="writing shards", unit="sample", disable=not progress)
    try:
        for line, sample in enumerate(bar, start=1):
            clip_ids = [c.clip_id for c in sample.clips]
            if len(clip_ids) > MAX_CLIPS:
                skipped.append({"line": line, "clips": clip_ids[:3] + ["..."],
                                "reason": f"{len(clip_ids)} clips, more than {MAX_CLIPS}"})
                continue
            members: dict[str, bytes] = {}
            bad: list[str] = []
            for m, cid in enumerate(clip_ids):
                try:
                    with open(clip_video_path(video_root, cid), "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
                if not data:
                    bad.append(cid)
                members[clip_member(m)] = data
            if bad:
                skipped.append({"line": line, "clips": bad, "reason": "clip file missing or empty"})
                continue
            doc = {"video_id": clip_ids[0].split(".", 1)[0], "clips": clip_ids,
                   "texts": [c.text for c in sample.clips]}
            members[JSON_MEMBER] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
            sink.write(sample_key(line - 1), members)  # the sample's number in the file, skipped ones counted
            total += 1
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()

    keep = {s["name"] for s in sink.shards}
    for name in os.listdir(out_dir):  # shards of an earlier, larger set
        if SHARD_NAME_RE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "total": total, "shards": sink.shards,
             "samples_per_shard": samples_per_shard, "skipped": len(skipped)}
    report = {"annotations": annotations, "video_root": video_root, "out": out_dir, "samples_in_annotations":
              len(samples), "written": total, "shards": len(sink.shards),
              "bytes": sum(s["bytes"] for s in sink.shards), "skipped": skipped}
    write_json(os.path.join(out_dir, "report.json"), report)
    write_json(index_path, index)
    return {**index, "report": report}
