"""Re-encoding with PyAV (`lfvila_model.data.transcode`): frame choice at the output rate, sizes, spans, errors,
and the parallel, resumable driver. Real files, encoded here: small (64x48), a few seconds, several containers.

Source frame i is a flat grey of value `LEVEL(i)`, so the value read back from an output frame says which source
frame it shows (lossy codecs move it by a few levels; levels are 6 apart)."""

import os

import av
import numpy as np
import pytest

from lfvila_model.data import transcode as T
from lfvila_model.data.video import VideoReadError, decode_all_frames
from tests.helpers import grey_level, write_grey_video


LEVEL = grey_level
make_video = write_grey_video  # (also used by test_prepare_benchmarks)


def probe(path):
    """(frames, average fps, width, height) of an mp4's video stream."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.frames, float(s.average_rate), s.width, s.height


def levels(path):
    return decode_all_frames(path)[:, 8, 8, 0].astype(int)


def expected_levels(src_fps, out_fps, n, start=0.0):
    """Output frame k shows the last source frame at or before start + k / out_fps."""
    return np.array([LEVEL(int(np.floor((start + k / out_fps) * src_fps + 1e-9))) for k in range(n)])


@pytest.mark.parametrize("container,codec,src_fps", [("mp4", "libx264", 10), ("mkv", "mpeg4", 25),
                                                     ("webm", "libvpx", 10)])
def test_resampled_to_fps_with_the_short_side(tmp_path, container, codec, src_fps):
    src = make_video(tmp_path / f"in.{container}", seconds=4, fps=src_fps, codec=codec)
    info = T.transcode_video(src, tmp_path / "out.mp4", fps=3, short_side=32)
    # 4 s at 3 fps: output times 0, 1/3, ..., 11/3; 64x48 -> short side 32, 64 * 32 / 48 = 42.7 -> 42 (even)
    assert info == {"frames": 12, "fps": 3.0, "width": 42, "height": 32, "seconds": 4.0, "source_size": [64, 48]}
    assert probe(tmp_path / "out.mp4") == (12, 3.0, 42, 32)
    np.testing.assert_allclose(levels(tmp_path / "out.mp4"), expected_levels(src_fps, 3, 12), atol=5)
    assert sorted(os.listdir(tmp_path)) == sorted([f"in.{container}", "out.mp4"])  # no temporary file left


def test_span_cut_is_frame_accurate_and_max_seconds_bounds_it(tmp_path):
    src = make_video(tmp_path / "in.mp4", seconds=4, fps=10)
    info = T.transcode_video(src, tmp_path / "cut.mp4", fps=3, start=1.0, end=2.5)
    # output times 1.0, 1.33, 1.67, 2.0, 2.33 -> source frames 10, 13, 16, 20, 23 (not the keyframe before 1.0)
    assert info["frames"] == 5 and info["width"] == 64 and info["height"] == 48
    np.testing.assert_allclose(levels(tmp_path / "cut.mp4"), [LEVEL(i) for i in (10, 13, 16, 20, 23)], atol=5)
    info = T.transcode_video(src, tmp_path / "max.mp4", fps=2, max_seconds=1.6)
    assert info["frames"] == 4 and info["seconds"] == 2.0  # times 0, 0.5, 1.0, 1.5 < 1.6
    info = T.transcode_video(src, tmp_path / "both.mp4", fps=3, start=3.0, max_seconds=10)
    assert info["frames"] == 3  # 3.0, 3.33, 3.67; the video ends at 4.0
    np.testing.assert_allclose(levels(tmp_path / "both.mp4"), expected_levels(10, 3, 3, start=3.0), atol=5)


def test_output_sizes_are_even_and_keep_the_aspect(tmp_path):
    assert T.output_size(640, 360, 224) == (398, 224)
    assert T.output_size(360, 640, 224) == (224, 398)
    assert T.output_size(63, 47) == (62, 46)
    assert T.output_size(64, 48, 33) == (44, 34)  # an odd short side becomes even too
    src = make_video(tmp_path / "portrait.mp4", seconds=1, fps=6, size=(48, 64))
    info = T.transcode_video(src, tmp_path / "p.mp4", fps=3, short_side=24)
    assert (info["width"], info["height"], info["frames"]) == (24, 32, 3)
    with pytest.raises(ValueError, match="short_side"):
        T.output_size(64, 48, 1)


def test_unusable_inputs_raise_video_read_error_and_leave_nothing(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    with pytest.raises(VideoReadError, match="cannot open") as e:
        T.transcode_video(tmp_path / "corrupt.mp4", tmp_path / "a.mp4")
    assert e.value.path == str(tmp_path / "corrupt.mp4")
    with pytest.raises(VideoReadError, match="file not found"):
        T.transcode_video(tmp_path / "absent.mkv", tmp_path / "a.mp4")
    src = make_video(tmp_path / "in.mp4", seconds=1, fps=10)
    with pytest.raises(VideoReadError, match=r"no frame in the span \[5 s"):
        T.transcode_video(src, tmp_path / "a.mp4", start=5)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        T.transcode_video(src, tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match="end must be after start"):
        T.transcode_video(src, tmp_path / "a.mp4", start=1, end=1)
    assert sorted(os.listdir(tmp_path)) == ["corrupt.mp4", "in.mp4"]


def test_driver_is_parallel_resumable_and_lists_failures(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    srcs = [make_video(raw / "a.mp4", seconds=2), make_video(raw / "b.mkv", seconds=1, codec="mpeg4")]
    (raw / "bad.webm").write_bytes(b"not a video at all")
    jobs = [T.TranscodeJob(s, str(tmp_path / "out" / (os.path.basename(s) + ".mp4")))
            for s in srcs + [str(raw / "bad.webm"), str(raw / "gone.mp4")]]
    r = T.transcode_videos(jobs, fps=3, short_side=24, workers=2, progress=False)
    assert sorted(os.path.basename(p) for p in r.done) == ["a.mp4.mp4", "b.mkv.mp4"] and r.existing == []
    assert set(r.failed) == {str(raw / "bad.webm"), str(raw / "gone.mp4")}
    assert "cannot open" in r.failed[str(raw / "bad.webm")] and r.failed[str(raw / "gone.mp4")] == "file not found"
    assert probe(tmp_path / "out" / "a.mp4.mp4") == (6, 3.0, 32, 24)
    mtimes = {p: os.stat(p).st_mtime_ns for p in r.done}

    again = T.transcode_videos(jobs, fps=3, short_side=24, workers=2, progress=False)
    assert again.done == [] and sorted(again.existing) == sorted(r.done) and set(again.failed) == set(r.failed)
    assert {p: os.stat(p).st_mtime_ns for p in r.done} == mtimes  # nothing redone
    assert sorted(os.listdir(tmp_path / "out")) == ["a.mp4.mp4", "b.mkv.mp4"]

    with pytest.raises(ValueError, match="same output"):
        T.transcode_videos([jobs[0], T.TranscodeJob(srcs[1], jobs[0].dst)], progress=False)
    with pytest.raises(ValueError, match="workers"):
        T.transcode_videos(jobs, workers=0, progress=False)
