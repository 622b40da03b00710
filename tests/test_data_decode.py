"""Decoding only what is needed: seeking to the keyframe before each wanted frame returns exactly the frames of a
full sequential decode, on videos with B-frames and several groups of pictures written here with PyAV."""

import av
import numpy as np
import pytest

from lfvila_model.data import video as V


def _encode(path, n, codec, gop, bframes, fps=25, h=48, w=64):
    """Moving noise (every frame distinct) with a marker square; keyframe every `gop` frames, `bframes` B-frames."""
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    c = av.open(str(path), "w", format="mp4")
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if codec == "libx264":
        s.options = {"preset": "ultrafast", "crf": "23", "threads": "1",
                     "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:b-adapt=0"}
    else:
        s.codec_context.gop_size = gop
        s.codec_context.max_b_frames = bframes
        s.thread_count = 1
    for i in range(n):
        img = np.roll(base, 3 * i, axis=1)
        img[:8, :8] = (7 * i) % 256
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def _sparse(path, wanted, gap):
    """The no-fallback decoding path itself (raises V._NoSeek where decode_frames would fall back)."""
    c = av.open(str(path))
    try:
        return V._decode_sparse(c, str(path), wanted, gap)
    finally:
        c.close()


def _picture_types(path):
    c = av.open(str(path))
    try:
        return {int(f.pict_type) for f in c.decode(c.streams.video[0])}
    finally:
        c.close()


@pytest.fixture(scope="module", params=[("libx264", 2), ("libx264", 3), ("mpeg4", 2)], ids=lambda p: f"{p[0]}-b{p[1]}")
def long_video(request, tmp_path_factory):
    codec, bframes = request.param
    path = tmp_path_factory.mktemp("seek") / f"{codec}.mp4"
    _encode(path, 260, codec, gop=25, bframes=bframes)
    return str(path), V.decode_all_frames(path)


def test_test_videos_have_b_frames_and_several_gops(long_video):
    path, full = long_video
    assert len(full) == 260 and {1, 2, 3} <= _picture_types(path)  # AV_PICTURE_TYPE I, P, B
    c = av.open(path)
    keys = sum(1 for p in c.demux(c.streams.video[0]) if p.is_keyframe)
    c.close()
    assert keys >= 10


@pytest.mark.parametrize("indices", [
    [0, 259],
    [1, 60, 61, 200, 250, 259],
    [24, 25, 26, 49, 50, 51, 99, 100, 101, 124, 125],  # around keyframes
    [259, 3, 130, 130, 77],  # any order, repeats
    "linspace",
])
def test_seeking_returns_the_frames_of_a_full_decode(long_video, indices):
    path, full = long_video
    idx = list(np.linspace(0, 259, 32).astype(int)) if indices == "linspace" else indices
    wanted = sorted(set(int(i) for i in idx))
    for gap in (0, None):  # the sparse path itself, no fallback
        assert sorted(_sparse(path, wanted, gap)) == wanted
    for gap in (0, 8, V.MIN_SEEK_GAP, None):
        got = V.decode_frames(path, idx, min_seek_gap=gap)
        assert np.array_equal(got, full[idx]), gap


def test_seeking_decodes_fewer_frames(long_video, monkeypatch):
    path, full = long_video
    calls = {"seek": 0}
    real = av.container.InputContainer.seek

    def counting(self, *a, **k):
        calls["seek"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(av.container.InputContainer, "seek", counting)
    V.decode_frames(path, [0, 5, 10])  # short gaps: sequential
    assert calls["seek"] == 0
    V.decode_frames(path, [0, 100, 200])
    assert calls["seek"] == 2


def test_irregular_timestamps_fall_back_to_the_sequential_decode(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    _encode(path, 120, "libx264", gop=10, bframes=2)
    full = V.decode_all_frames(path)
    monkeypatch.setattr(V, "_frame_duration", lambda stream: 7.3)  # a grid the timestamps do not follow
    with pytest.raises(V._NoSeek):
        _sparse(path, [0, 100], 10)
    assert np.array_equal(V.decode_frames(path, [0, 100, 119], min_seek_gap=10), full[[0, 100, 119]])


def test_truncated_request_still_raises(long_video):
    path, _ = long_video
    with pytest.raises(V.VideoReadError, match="frame 260 requested, only 260"):
        V.decode_frames(path, [0, 260], min_seek_gap=0)
