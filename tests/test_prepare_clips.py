"""`lfvila prepare clips` (`lfvila_model.data.hdvila`): HD-VILA metadata + transcripts + raw videos -> clips cut by
span at the output rate, grouped into pre-training samples; resumable; bad and missing videos reported, not fatal.

Raw videos are encoded here with PyAV: 64x48, 10 fps, a keyframe every 10 frames (so cuts seek), source frame i a
flat grey of value `LEVEL(i)`: the value read back from a clip's frame says which source frame it shows (lossy
codecs move it by a few levels; levels are 6 apart)."""

import functools
import json
import math
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from lfvila_model.cli import main
from lfvila_model.data import hdvila as H
from lfvila_model.data.annotations import AnnotationError, read_pretrain_jsonl
from lfvila_model.data.transcode import temporary_name
from lfvila_model.data.video import decode_all_frames
from tests.helpers import grey_level, write_grey_video

SRC_FPS = 10


LEVEL = grey_level
make_video = functools.partial(write_grey_video, seconds=8.0, fps=SRC_FPS, keyint=10)


def stamp(seconds):
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:06.3f}"


def clip_entry(vid, n, start, end):
    return {"clip_id": f"{vid}.{n}.mp4", "span": [stamp(start), stamp(end)]}


def write_lines(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def levels(path):
    return decode_all_frames(str(path))[:, 8, 8, 0].astype(int)


def expected_levels(start, end, fps):
    """Output frame k stands at start + k / fps (while before end) and shows the last source frame at or before."""
    n = math.ceil((end - start) * fps - 1e-9)
    return [LEVEL(int(math.floor((start + k / fps) * SRC_FPS + 1e-9))) for k in range(n)]


def probe(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.frames, float(s.average_rate), s.width, s.height


@pytest.fixture
def corpus(tmp_path):
    """Three videos: `vA` (8 s, mp4, clips 0..5 of 1.3 s from 0.45 s), `vB` (5 s, mkv, clips 0..3 of 1 s),
    `vC` (in META, no raw file). Every clip has a text."""
    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "vA.mp4", seconds=8)
    make_video(raw / "vB.mkv", seconds=5, codec="mpeg4")
    meta = [{"video_id": "vA", "url": "https://example.invalid/vA",
             "clip": [clip_entry("vA", n, 0.45 + 1.3 * n, 0.45 + 1.3 * (n + 1)) for n in range(6)]},
            {"video_id": "vB", "url": "u", "clip": [clip_entry("vB", n, n, n + 1) for n in range(4)]},
            {"video_id": "vC", "url": "u", "clip": [clip_entry("vC", n, n, n + 1) for n in range(4)]}]
    texts = [{"clip_id": c["clip_id"], "text": f" sentence of {c['clip_id']} "} for v in meta for c in v["clip"]]
    return {"raw": str(raw), "meta": write_lines(tmp_path / "meta.jsonl", meta),
            "text": write_lines(tmp_path / "text.jsonl", texts), "out": str(tmp_path / "out"), "meta_rows": meta}


def clip_path(out, clip_id):
    return os.path.join(out, "clips", clip_id.split(".")[0], clip_id)


# ----------------------------------------------------------------------------------------------------------------


def test_timestamps_clip_ids_and_runs():
    assert H.parse_timestamp("00:01:02.500") == 62.5
    assert H.parse_timestamp("01:00:00") == 3600.0
    assert H.parse_timestamp("2:03.25") == 123.25
    assert H.parse_timestamp("7.5") == 7.5 and H.parse_timestamp(4) == 4.0
    for bad in ("00:61:00", "00:00:60.0", "1:2:3:4", "abc", "-1", -1.0, True, None, float("nan")):
        with pytest.raises(ValueError, match="timestamp|below 60"):
            H.parse_timestamp(bad)
    assert H.parse_clip_id("abc_-x.12.mp4") == ("abc_-x", 12)
    for bad in ("abc.mp4", "a.b.3.mp4", "abc.x.mp4", "abc.3.mkv", ".3.mp4", 3):
        with pytest.raises(ValueError, match="clip_id"):
            H.parse_clip_id(bad)
    assert H.consecutive_runs([0, 1, 2, 3, 5, 6, 7, 8, 9, 11], 4) == [[0, 1, 2, 3], [5, 6, 7, 8, 9]]
    assert H.consecutive_runs([9, 3, 4, 2, 4], 3) == [[2, 3, 4]]
    assert H.consecutive_runs([0, 2, 4], 1) == [[0], [2], [4]]
    assert H.consecutive_runs([], 1) == []


def test_clips_are_cut_frame_accurately_at_fps_and_short_side(corpus):
    rep = H.prepare_clips(corpus["meta"], corpus["text"], corpus["raw"], corpus["out"], fps=3, short_side=32,
                          workers=2, progress=False)
    assert rep["clips"]["cut_now"] == 10 and rep["clips"]["failed"] == 0 and rep["samples"] == 2
    for v in corpus["meta_rows"][:2]:
        for c in v["clip"]:
            path = clip_path(corpus["out"], c["clip_id"])
            start, end = (H.parse_timestamp(t) for t in c["span"])
            want = expected_levels(start, end, 3)
            frames, fps, w, h = probe(path)
            # 64x48 -> short side 32: 64 * 32 / 48 = 42.7 -> 42 (even); 1.3 s at 3 fps: 4 frames, 1 s: 3
            assert (frames, fps, w, h) == (len(want), 3.0, 42, 32), c["clip_id"]
            got = levels(path)
            # the first and last frames are the source frames at the span's start and last output time
            np.testing.assert_allclose(got, want, atol=5, err_msg=c["clip_id"])
    # vA.2 starts at 3.05 s: source frame 30, a keyframe's neighbour; vA.3 at 4.35 s: frame 43, mid-GOP
    np.testing.assert_allclose(levels(clip_path(corpus["out"], "vA.3.mp4"))[[0, -1]], [LEVEL(43), LEVEL(53)], atol=5)
    # another rate, no resizing: the source size and 2 frames per second
    rep = H.prepare_clips(corpus["meta"], corpus["text"], corpus["raw"], corpus["out"] + "2", fps=2, workers=1,
                          progress=False)
    frames, fps, w, h = probe(clip_path(corpus["out"] + "2", "vA.0.mp4"))
    assert (frames, fps, w, h) == (3, 2.0, 64, 48)  # 0.45, 0.95, 1.45 < 1.75
    np.testing.assert_allclose(levels(clip_path(corpus["out"] + "2", "vA.0.mp4")), expected_levels(0.45, 1.75, 2),
                               atol=5)


def test_samples_are_maximal_runs_of_clips_with_text(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "v1.mp4", seconds=14, keyint=30)
    make_video(raw / "v2.webm", seconds=3, codec="libvpx")
    numbers = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12]  # gaps at 4 and 11
    meta = [{"video_id": "v1", "url": "u", "clip": [clip_entry("v1", n, n, n + 1) for n in numbers]},
            {"video_id": "v2", "url": "u", "clip": [clip_entry("v2", n, n * 0.5, n * 0.5 + 0.5) for n in range(5)]}]
    no_text = {"v1.7.mp4"}  # splits 5..10 into 5, 6 and 8, 9, 10
    texts = [{"clip_id": c["clip_id"], "text": f"t {c['clip_id']}"} for v in meta for c in v["clip"]
             if c["clip_id"] not in no_text]
    texts.append({"clip_id": "v2.2.mp4", "text": "a repeated line keeps the first text"})
    texts.append({"clip_id": "zz.0.mp4", "text": "a clip of no video in META"})
    for t in texts:
        if t["clip_id"] == "v2.3.mp4":
            t["text"] = "   "  # blank: no text, splits v2 into 0..2 and 4
    meta_path, text_path = write_lines(tmp_path / "m.jsonl", meta), write_lines(tmp_path / "t.jsonl", texts)

    out = str(tmp_path / "k3")
    rep = H.prepare_clips(meta_path, text_path, raw, out, min_clips=3, workers=2, progress=False)
    got = [[c.clip_id for c in s.clips] for s in read_pretrain_jsonl(os.path.join(out, "pretrain.jsonl"))]
    assert got == [["v1.0.mp4", "v1.1.mp4", "v1.2.mp4", "v1.3.mp4"], ["v1.8.mp4", "v1.9.mp4", "v1.10.mp4"],
                   ["v2.0.mp4", "v2.1.mp4", "v2.2.mp4"]]
    sample = read_pretrain_jsonl(os.path.join(out, "pretrain.jsonl"))[2]
    assert [c.text for c in sample.clips] == ["t v2.0.mp4", "t v2.1.mp4", "t v2.2.mp4"]  # first text, stripped
    # only the clips of runs are cut
    assert sorted(os.listdir(os.path.join(out, "clips", "v1"))) == sorted(
        f"v1.{n}.mp4" for n in (0, 1, 2, 3, 8, 9, 10))
    assert rep["clips"]["in_meta"] == 16 and rep["clips"]["with_text"] == 14 and rep["clips"]["in_samples"] == 10
    assert rep["transcript_lines_left_out"] == 2 and rep["clips_per_sample"] == {"min": 3, "max": 4, "mean": 3.333}

    out = str(tmp_path / "k4")
    H.prepare_clips(meta_path, text_path, raw, out, min_clips=4, workers=1, progress=False)
    assert [len(s.clips) for s in read_pretrain_jsonl(os.path.join(out, "pretrain.jsonl"))] == [4]
    out = str(tmp_path / "k1")
    H.prepare_clips(meta_path, text_path, raw, out, min_clips=1, workers=2, progress=False)
    got = [[c.clip_id.split(".")[1] for c in s.clips] for s in read_pretrain_jsonl(os.path.join(out, "pretrain.jsonl"))]
    assert got == [["0", "1", "2", "3"], ["5", "6"], ["8", "9", "10"], ["12"], ["0", "1", "2"], ["4"]]
    out = str(tmp_path / "k5")
    rep = H.prepare_clips(meta_path, text_path, raw, out, min_clips=5, workers=1, progress=False)
    assert rep["samples"] == 0 and rep["pretrain_jsonl"] is None and not os.path.exists(os.path.join(out, "pretrain.jsonl"))


def test_second_run_redoes_nothing_and_a_killed_clip_is_redone(corpus):
    args = (corpus["meta"], corpus["text"], corpus["raw"], corpus["out"])
    first = H.prepare_clips(*args, workers=2, progress=False)
    paths = [clip_path(corpus["out"], f"vA.{n}.mp4") for n in range(6)] + \
            [clip_path(corpus["out"], f"vB.{n}.mp4") for n in range(4)]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    again = H.prepare_clips(*args, workers=2, progress=False)
    assert again["clips"]["cut_now"] == 0 and again["clips"]["already_cut"] == 10
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before
    with open(os.path.join(corpus["out"], "pretrain.jsonl")) as f:
        assert f.read().count("\n") == first["samples"] == 2

    # a run killed while writing vA.4: its temporary file is there, the clip is not
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = clip_path(corpus["out"], "vA.4.mp4")
    os.remove(killed)
    tmp = temporary_name(killed, pid=dead.pid)
    with open(tmp, "wb") as f:
        f.write(b"\x00" * 100)  # half a file
    third = H.prepare_clips(*args, workers=1, progress=False)
    assert third["clips"]["cut_now"] == 1 and third["clips"]["already_cut"] == 9
    assert not os.path.exists(tmp) and probe(killed)[0] == 4
    assert {p: os.stat(p).st_mtime_ns for p in paths if p != killed} == {p: t for p, t in before.items() if p != killed}
    # re-encoding options may not change under existing clips (they would not be redone)
    with pytest.raises(ValueError, match=r"other options \(--fps 3.0 -> 2.0\)"):
        H.prepare_clips(*args, fps=2, progress=False)
    # min_clips may: nothing is re-encoded
    assert H.prepare_clips(*args, min_clips=6, progress=False)["samples"] == 1


def test_bad_and_missing_videos_are_reported_not_fatal(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "good.mp4", seconds=4.5)
    (raw / "broken.mp4").write_bytes(os.urandom(4000))
    (raw / "notes.txt").write_text("not a video")
    meta = [{"video_id": "good", "url": "u",
             # clip 4 lies after the video's end: it cannot be cut and splits the run
             "clip": [clip_entry("good", n, n * 0.8, n * 0.8 + 0.8) for n in range(4)]
             + [clip_entry("good", 4, 9.0, 10.0)] + [clip_entry("good", n, n * 0.8 - 1.5, n * 0.8 - 0.7)
                                                     for n in (5, 6, 7)]
             + [{"clip_id": "good.8.mp4", "span": ["00:00:03.000", "00:00:02.000"]},  # backwards span
                {"clip_id": "other.9.mp4", "span": [0, 1]},  # not of this video
                {"clip_id": "good.0.mp4", "span": [0, 1]},  # repeated
                {"span": [0, 1]}]},
            {"video_id": "broken", "url": "u", "clip": [clip_entry("broken", n, n, n + 1) for n in range(4)]},
            {"video_id": "gone", "url": "u", "clip": [clip_entry("gone", n, n, n + 1) for n in range(4)]},
            {"video_id": "notes", "url": "u", "clip": [clip_entry("notes", n, n, n + 1) for n in range(4)]}]
    texts = [{"clip_id": f"{v}.{n}.mp4", "text": f"s{n}"} for v in ("good", "broken", "gone", "notes")
             for n in range(9)]
    out = tmp_path / "out"
    rep = H.prepare_clips(write_lines(tmp_path / "m.jsonl", meta), write_lines(tmp_path / "t.jsonl", texts), raw, out,
                          min_clips=3, workers=2, progress=False)
    got = [[c.clip_id for c in s.clips] for s in read_pretrain_jsonl(out / "pretrain.jsonl")]
    assert got == [["good.0.mp4", "good.1.mp4", "good.2.mp4", "good.3.mp4"],
                   ["good.5.mp4", "good.6.mp4", "good.7.mp4"]]
    assert rep["missing_videos"] == ["gone", "notes"]  # notes.txt is no video file
    assert set(rep["unreadable_videos"]) == {"broken"} and "cannot open" in rep["unreadable_videos"]["broken"]["reason"]
    assert rep["unreadable_videos"]["broken"]["path"] == str(raw / "broken.mp4")
    assert list(rep["unreadable_clips"]) == ["good.4.mp4"] and "no frame in the span" in rep["unreadable_clips"][
        "good.4.mp4"]
    assert set(rep["malformed_clips"]) == {"good.8.mp4", "other.9.mp4", "good.0.mp4", "good#11"}
    assert "not after its start" in rep["malformed_clips"]["good.8.mp4"]
    assert "repeated" in rep["malformed_clips"]["good.0.mp4"]
    with open(out / "report.json") as f:
        assert json.load(f)["unreadable_clips"] == rep["unreadable_clips"]
    assert rep["videos"] == {"in_meta": 4, "with_candidate_runs": 4, "missing": 2, "unreadable": 1, "in_samples": 1}
    assert not [n for n in os.listdir(out / "clips" / "good") if n.startswith(".")]  # no temporary file left


def test_malformed_lines_and_bad_arguments_are_named(tmp_path, corpus):
    bad = write_lines(tmp_path / "bad.jsonl", [{"video_id": "a", "clip": []}, "{not json"])
    with pytest.raises(AnnotationError, match=r"bad.jsonl:2: not valid JSON"):
        H.read_hdvila_meta(bad)
    with pytest.raises(AnnotationError, match=r"nov.jsonl:1: 'video_id' must be"):
        H.read_hdvila_meta(write_lines(tmp_path / "nov.jsonl", [{"clip": []}]))
    with pytest.raises(AnnotationError, match=r"dup.jsonl:2: video_id 'a' already given at line 1"):
        H.read_hdvila_meta(write_lines(tmp_path / "dup.jsonl", [{"video_id": "a", "clip": []}] * 2))
    with pytest.raises(AnnotationError, match=r"t.jsonl:1: expected"):
        H.read_transcripts(write_lines(tmp_path / "t.jsonl", [{"clip_id": "a.0.mp4", "text": 3}]))
    args = (corpus["meta"], corpus["text"], corpus["raw"], tmp_path / "o")
    for kw, msg in [({"min_clips": 0}, "min_clips must be"), ({"fps": 0}, "fps must be"),
                    ({"short_side": 1}, "short_side must be"), ({"workers": 0}, "workers must be")]:
        with pytest.raises(ValueError, match=msg):
            H.prepare_clips(*args, progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="meta .* not found"):
        H.prepare_clips(tmp_path / "absent.jsonl", *args[1:], progress=False)
    with pytest.raises(FileNotFoundError, match="raw_dir .* not found"):
        H.prepare_clips(args[0], args[1], tmp_path / "nowhere", args[3], progress=False)


def test_cli_help_errors_and_run(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "clips", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--meta", "--transcripts", "--videos", "--out", "--fps", "--short-side", "--min-clips", "--workers"):
        assert opt in text
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "clips" in capsys.readouterr().out
    common = ["prepare", "clips", "--meta", corpus["meta"], "--transcripts", corpus["text"], "--videos",
              corpus["raw"], "--out", corpus["out"]]
    for opt, value in [("--min-clips", "0"), ("--fps", "0"), ("--workers", "x"), ("--short-side", "1")]:
        with pytest.raises(SystemExit) as e:
            main(common + [opt, value])
        assert e.value.code == 2 and f"argument {opt}:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prepare", "clips", "--meta", str(tmp_path / "none.jsonl")] + common[4:])
    assert "lfvila prepare clips: error: meta" in str(e.value.code) and "none.jsonl" in str(e.value.code)

    assert main(common + ["--short-side", "24", "--workers", "2", "--no-progress"]) == 0
    assert "2 samples (10 clips)" in capsys.readouterr().out
    assert probe(clip_path(corpus["out"], "vB.0.mp4"))[2:] == (32, 24)


def test_a_cut_seeks_and_gives_the_frames_of_a_full_decode(tmp_path, monkeypatch):
    """The transcoder's seek (used for every clip) changes how much is decoded, never which frames are written,
    also where the container lands after the span's start (then it decodes from the beginning)."""
    from lfvila_model.data import transcode as T

    src = make_video(tmp_path / "v.mp4", seconds=8)
    decoded = []
    decode = av.container.InputContainer.decode

    def counting_decode(self, *a, **k):
        for f in decode(self, *a, **k):
            decoded.append(f.pts)
            yield f

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    T.transcode_video(src, tmp_path / "full.mp4", fps=3, start=6.35, end=7.4, seek=False)
    full = len(decoded)
    decoded.clear()
    T.transcode_video(src, tmp_path / "seek.mp4", fps=3, start=6.35, end=7.4)
    assert len(decoded) < full / 3  # from the keyframe at 6.0 s, not from 0
    want = expected_levels(6.35, 7.4, 3)
    np.testing.assert_allclose(levels(tmp_path / "seek.mp4"), want, atol=5)
    np.testing.assert_array_equal(levels(tmp_path / "seek.mp4"), levels(tmp_path / "full.mp4"))

    seek = av.container.InputContainer.seek
    monkeypatch.setattr(av.container.InputContainer, "seek",  # lands 2 s late (time base 1/10240 here)
                        lambda self, offset, **k: seek(self, offset + 2 * 10240, **k))
    decoded.clear()
    T.transcode_video(src, tmp_path / "late.mp4", fps=3, start=3.35, end=4.4)
    assert len(decoded) > 40  # decoded again from the beginning
    np.testing.assert_allclose(levels(tmp_path / "late.mp4"), expected_levels(3.35, 4.4, 3), atol=5)
