"""PyAV decoding, frame-index sampling and the train/eval transforms, on mp4 files made here."""

import av
import numpy as np
import pytest
import torch

from lfvila_model.data import video as V

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def solid_frames(t, h=32, w=48):
    """Frame i is one solid colour, distinct per frame and per channel."""
    cols = np.array([[10 + 20 * i, 230 - 15 * i, 60 + 9 * i] for i in range(t)], dtype=np.uint8)
    return np.broadcast_to(cols[:, None, None, :], (t, h, w, 3)).copy()


@pytest.fixture(scope="module")
def solid_mp4(tmp_path_factory):
    p = tmp_path_factory.mktemp("vid") / "solid.mp4"
    fr = solid_frames(10)
    V.write_video(p, fr, codec="mpeg4")
    return str(p), fr


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_round_trip_frame_count_and_values(tmp_path, codec):
    fr = solid_frames(7)
    p = tmp_path / f"{codec}.mp4"
    V.write_video(p, fr, codec=codec)
    assert V.count_frames(p) == 7
    got = V.decode_all_frames(p)
    assert got.shape == (7, 32, 48, 3) and got.dtype == np.uint8
    # lossy codec + yuv420p: solid colours come back within a few levels
    assert np.abs(got.astype(int) - fr.astype(int)).max() <= 6


def test_decode_selected_indices_in_requested_order(solid_mp4):
    p, fr = solid_mp4
    got = V.decode_frames(p, [9, 0, 4, 4])
    assert got.shape == (4, 32, 48, 3)
    assert np.abs(got.astype(int) - fr[[9, 0, 4, 4]].astype(int)).max() <= 6
    with pytest.raises(V.VideoReadError, match="frame 10 requested, only 10"):
        V.decode_frames(p, [10])
    with pytest.raises(ValueError, match="indices must be >= 0"):
        V.decode_frames(p, [-1])


def test_missing_and_corrupt_files_raise_video_read_error(tmp_path, solid_mp4):
    with pytest.raises(V.VideoReadError) as ei:
        V.decode_all_frames(tmp_path / "missing.mp4")
    assert ei.value.reason == "file not found" and ei.value.path.endswith("missing.mp4")
    data = open(solid_mp4[0], "rb").read()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: cannot open
    (tmp_path / "text.mp4").write_bytes(b"this is not a video at all" * 10)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("half.mp4", "text.mp4", "empty.mp4"):
        with pytest.raises(V.VideoReadError, match=name):
            V.decode_all_frames(tmp_path / name)
        with pytest.raises(V.VideoReadError):
            V.count_frames(tmp_path / name)


def test_truncated_file_with_index_first_is_caught(tmp_path):
    # faststart puts the index first: the header still promises 10 frames, the data for the last ones is gone
    rng = np.random.default_rng(0)
    fr = rng.integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    p = tmp_path / "fs.mp4"
    c = av.open(str(p), "w", format="mp4", options={"movflags": "faststart"})
    s = c.add_stream("mpeg4", rate=3)
    s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
    for f in fr:
        for pk in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
    c.close()
    data = p.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    assert V.count_frames(tmp_path / "cut.mp4") == 10
    with pytest.raises(V.VideoReadError, match="truncated"):
        V.decode_all_frames(tmp_path / "cut.mp4")
    with pytest.raises(V.VideoReadError, match="truncated"):
        V.decode_frames(tmp_path / "cut.mp4", [9])


def test_write_video_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="even H, W"):
        V.write_video(tmp_path / "x.mp4", np.zeros((2, 31, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        V.write_video(tmp_path / "x.mp4", np.zeros((2, 32, 48, 3), np.float32))


# ------------------------------------------------------------------------------------------ sampling


def test_eval_indices_hand_computed():
    assert V.downstream_indices(10, 4, train=False).tolist() == [0, 3, 6, 9]
    assert V.downstream_indices(10, 5, train=False).tolist() == [0, 2, 4, 6, 9]  # 0, 2.25, 4.5, 6.75, 9
    assert V.downstream_indices(3, 5, train=False).tolist() == [0, 0, 1, 1, 2]  # 0, .5, 1, 1.5, 2
    assert V.downstream_indices(1, 3, train=False).tolist() == [0, 0, 0]
    idx = V.downstream_indices(100, 32, train=False)
    assert idx[0] == 0 and idx[-1] == 99 and idx[1] == 3 and idx[7] == 22  # 99/31 = 3.19, 7*99/31 = 22.35


def test_train_jitter_ranges_hand_computed():
    rng = np.random.default_rng(0)
    draws = [V.downstream_indices(10, 4, train=True, rng=rng) for _ in range(400)]
    # interval = 10 // 3 = 3: start in {0..3}, end in {6..9}, every value reachable
    assert {int(d[0]) for d in draws} == {0, 1, 2, 3}
    assert {int(d[-1]) for d in draws} == {6, 7, 8, 9}
    one = next(d for d in draws if d[0] == 1 and d[-1] == 8)
    assert one.tolist() == [1, 3, 5, 8]  # linspace(1, 8, 4) = 1, 3.33, 5.67, 8
    big = [V.downstream_indices(100, 32, train=True, rng=rng) for _ in range(300)]
    # the official F = 32: interval = floor(100 / 31) = 3
    assert {int(d[0]) for d in big} == {0, 1, 2, 3} and {int(d[-1]) for d in big} == {96, 97, 98, 99}
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        V.downstream_indices(10, 4, train=True)
    with pytest.raises(ValueError, match="num_video_frames must be a positive integer"):
        V.downstream_indices(0, 4, train=False)


def test_clip_segment_starts_hand_computed():
    assert V.clip_segment_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert V.clip_segment_indices(10, 4).tolist() == [0, 2, 5, 7]  # 0, 2.5, 5, 7.5
    assert V.clip_segment_indices(3, 4).tolist() == [0, 0, 1, 2]  # 0, .75, 1.5, 2.25
    assert V.clip_segment_indices(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="frames_per_clip"):
        V.clip_segment_indices(4, 0)


# ------------------------------------------------------------------------------------------ transforms


def test_eval_sizes_official_and_proportional():
    assert V.eval_sizes((192, 320)) == ((240, 428), (216, 385))
    assert V.eval_sizes((64, 96)) == ((80, 128), (72, 116))  # 128.4 -> 128, 115.5 -> 116 (half up)
    with pytest.raises(ValueError, match="size must be"):
        V.eval_sizes((0, 5))


def test_normalisation_values_of_a_solid_frame():
    fr = np.empty((3, 40, 60, 3), np.uint8)
    fr[...] = (255, 0, 128)
    want = (np.array([1.0, 0.0, 128 / 255]) - MEAN) / STD  # (2.2489, -2.0357, 0.4734)
    for out in (V.eval_transform(fr, (32, 48)), V.train_transform(fr, (32, 48), np.random.default_rng(1))):
        assert out.shape == (3, 3, 32, 48) and out.dtype == torch.float32
        for c in range(3):
            assert torch.allclose(out[c], torch.full_like(out[c], float(want[c])), atol=1e-5)


def test_train_transform_one_crop_for_all_frames():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8)
    fr = np.repeat(img, 5, axis=0)
    outs = []
    for seed in range(6):
        out = V.train_transform(fr, (24, 32), np.random.default_rng(seed))
        assert out.shape == (3, 5, 24, 32)
        for t in range(1, 5):  # identical input frames -> identical outputs only if the box is shared
            assert torch.equal(out[:, t], out[:, 0])
        outs.append(out)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # but the box does vary between videos


def test_train_transform_flip_and_full_crop_exact():
    # scale 1 with the image's own aspect ratio: the crop is the whole frame, no resize; only the flip remains
    rng = np.random.default_rng(3)
    fr = rng.integers(0, 255, (2, 24, 32, 3), dtype=np.uint8)
    base = torch.from_numpy((fr.astype(np.float64) / 255 - MEAN) / STD).permute(3, 0, 1, 2).float()
    seen = set()
    for seed in range(20):
        out = V.train_transform(fr, (24, 32), np.random.default_rng(seed), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
        if torch.allclose(out, base, atol=1e-5):
            seen.add("plain")
        elif torch.allclose(out, base.flip(-1), atol=1e-5):
            seen.add("flipped")
        else:
            raise AssertionError("output is neither the frame nor its mirror")
    assert seen == {"plain", "flipped"}


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = V.random_resized_crop_params(192, 320, (0.8, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 192 and 0 <= left and left + w <= 320
        if (h, w) != (192, 256):  # not the centre fallback (320/192 > 4/3 clamps to 256 wide)
            assert 0.78 <= h * w / (192 * 320) <= 1.0 and 0.74 <= w / h <= 1.35


def test_eval_transform_is_centred_and_symmetric():
    # a left-dark / right-bright frame stays mirror-symmetric through resize, centre crop and resize
    fr = np.zeros((1, 40, 60, 3), np.uint8)
    fr[:, :, 30:] = 200
    out = V.eval_transform(fr, (40, 60))
    assert out.shape == (3, 1, 40, 60)
    left, right = out[..., :30], out[..., 30:].flip(-1)
    dark = (0 - MEAN[0]) / STD[0]
    bright = (200 / 255 - MEAN[0]) / STD[0]
    assert torch.allclose(left[0] - dark, -(right[0] - bright), atol=1e-4)
    # the crop (90%) is centred: columns 0 and 59 are pure dark / bright, with no border from outside the frame
    assert abs(out[0, 0, 20, 0] - dark) < 1e-4 and abs(out[0, 0, 20, 59] - bright) < 1e-4


def test_transform_argument_checks():
    fr = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        V.eval_transform(fr.astype(np.float32), (8, 8))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        V.eval_transform(np.zeros((8, 8, 3), np.uint8), (8, 8))
    with pytest.raises(TypeError, match="rng must be"):
        V.train_transform(fr, (8, 8), rng=None)


# ------------------------------------------------------------------------------------------ cache


def test_frame_cache_memory_and_disk(tmp_path, solid_mp4):
    p, fr = solid_mp4
    direct = V.decode_all_frames(p)
    mem = V.FrameCache("memory")
    a = mem.get(p)
    b = mem.get(p)
    assert a is b and mem.hits == 1 and mem.misses == 1 and np.array_equal(a, direct)
    assert not a.flags.writeable
    disk = V.FrameCache("disk", tmp_path / "cache")
    assert np.array_equal(disk.get(p), direct) and disk.misses == 1 and len(disk) == 1
    again = V.FrameCache("disk", tmp_path / "cache")  # a new process / run sees the stored frames
    assert np.array_equal(again.get(p), direct) and again.hits == 1 and again.misses == 0
    frames, idx = V.load_video(p, lambda n: V.downstream_indices(n, 4, train=False), cache=mem)
    assert idx.tolist() == [0, 3, 6, 9] and np.array_equal(frames, direct[[0, 3, 6, 9]])
    frames2, _ = V.load_video(p, lambda n: V.downstream_indices(n, 4, train=False))
    assert np.array_equal(frames, frames2)  # cached and uncached reads give the same pixels
    with pytest.raises(V.VideoReadError):
        mem.get(tmp_path / "none.mp4")
    with pytest.raises(ValueError, match="directory is required"):
        V.FrameCache("disk")
    with pytest.raises(ValueError, match="mode must be"):
        V.FrameCache("gpu")
