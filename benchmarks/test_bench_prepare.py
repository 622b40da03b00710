"""Preparing the pre-training set on the CPU: `lfvila prepare clips` throughput (clips/s on one core) and the disk a
sample takes as clip files and in shards, at 360p and 720p.

    pytest benchmarks/test_bench_prepare.py
    LFVILA_BENCH_PREPARE_VIDEOS=8 pytest benchmarks/test_bench_prepare.py --benchmark-json OUT.json

Setup (once per session, PyAV): LFVILA_BENCH_PREPARE_VIDEOS raw videos (default 2) per size, 640x360 and
1280x720, h264 at 30 fps with a keyframe every 2 s (YouTube-like), 8.5 s each, of content that is not trivially
compressible (a panning smooth random texture, a moving block, light noise: every frame differs). META gives each video
4 clips of 2 s starting at 0.25 s (so cuts seek and fall between keyframes), TEXT one sentence per clip: one
sample of 4 clips per video.

`test_prepare_clips[360p|720p]`: one round = `prepare_clips` (workers=1, the process pinned to one core) into an
empty folder, then `write_shards` over its output (not timed). extra_info: `clips_per_s` and `samples_per_s`
(per core), `source_seconds_per_s`, `clip_bytes_per_sample` (the 4 mp4 files), `shard_bytes_per_sample` (tar
members, headers and JSON included), `gb_per_1000_samples` (shard bytes per sample x 1000), `bytes_per_frame`.
LFVILA_BENCH_ROUNDS (default 3) rounds per case. Benchmarks measure; they assert nothing about speed.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from benchmarks.pinning import one_core

ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "3"))
VIDEOS = int(os.environ.get("LFVILA_BENCH_PREPARE_VIDEOS", "2"))
SRC_FPS, KEYINT, SECONDS = 30, 60, 8.5
CLIPS, CLIP_SECONDS, FIRST = 4, 2.0, 0.25
SIZES = {"360p": (360, 640), "720p": (720, 1280)}


def _frames(n: int, h: int, w: int, seed: int):
    """Camera-like frames: a smooth random texture panning (blurred 16-pixel blocks), a moving block and light
    sensor noise; every frame differs, as 3 fps samples of real footage do."""
    rng = np.random.default_rng(seed)
    th, tw = h + 16, w + 3 * n + 16
    tex = np.kron(rng.integers(0, 255, (th // 16 + 1, tw // 16 + 1, 3)).astype(np.float32),
                  np.ones((16, 16, 1), np.float32))[:th, :tw]
    for axis in (0, 1):  # a 9-pixel box blur along each axis: soft edges, as optics give
        c = np.cumsum(np.pad(tex, [(4, 5) if a == axis else (0, 0) for a in range(3)], mode="edge"), axis=axis)
        tex = (np.take(c, range(9, c.shape[axis]), axis=axis) - np.take(c, range(0, c.shape[axis] - 9),
                                                                        axis=axis)) / 9.0
    tex = np.minimum(tex, 249).astype(np.uint8)  # room for the noise: no uint8 wrap-around
    noise = rng.integers(0, 6, (3, h, w, 3), dtype=np.uint8)
    for i in range(n):
        x = 3 * i
        img = tex[i % 8:i % 8 + h, x:x + w].copy()
        by, bx = (5 * i) % (h - h // 3), (9 * i) % (w - w // 3)
        img[by:by + h // 3, bx:bx + w // 3] = (29 * i) % 256
        img += noise[i % 3]
        yield img


def _encode(path: str, h: int, w: int, seed: int) -> None:
    import av

    c = av.open(path, "w", format="mp4")
    s = c.add_stream("libx264", rate=SRC_FPS)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={KEYINT}:min-keyint={KEYINT}"}
    for img in _frames(int(SECONDS * SRC_FPS), h, w, seed):
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.fixture(scope="session")
def raw_sets(tmp_path_factory):
    """{tag: (meta, text, raw_dir)}, encoded once per session."""
    from lfvila_model.data.annotations import write_jsonl

    base = tmp_path_factory.mktemp("bench_prepare")
    out = {}
    for tag, (h, w) in SIZES.items():
        raw = base / tag / "raw"
        raw.mkdir(parents=True)
        meta, text = [], []
        for v in range(VIDEOS):
            vid = f"{tag}v{v}"
            _encode(str(raw / f"{vid}.mp4"), h, w, seed=v)
            clips = []
            for n in range(CLIPS):
                a = FIRST + n * CLIP_SECONDS
                clips.append({"clip_id": f"{vid}.{n}.mp4", "span": [f"00:00:{a:06.3f}", f"00:00:{a + CLIP_SECONDS:06.3f}"]})
                text.append({"clip_id": f"{vid}.{n}.mp4", "text": f"sentence {n} of video {v}."})
            meta.append({"video_id": vid, "url": "synthetic", "clip": clips})
        write_jsonl(base / tag / "meta.jsonl", meta)
        write_jsonl(base / tag / "text.jsonl", text)
        out[tag] = (str(base / tag / "meta.jsonl"), str(base / tag / "text.jsonl"), str(raw))
    return out


@pytest.mark.parametrize("tag", list(SIZES))
def test_prepare_clips(benchmark, raw_sets, tmp_path, tag):
    from lfvila_model.data.hdvila import prepare_clips
    from lfvila_model.data.shards import write_shards

    meta, text, raw = raw_sets[tag]
    out = str(tmp_path / "out")
    reports = []

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        return (), {}

    def run():
        reports.append(prepare_clips(meta, text, raw, out, fps=3, workers=1, progress=False))

    with one_core():
        benchmark.pedantic(run, setup=fresh, rounds=ROUNDS, iterations=1)
    rep = reports[-1]
    assert rep["clips"]["cut_now"] == VIDEOS * CLIPS and rep["samples"] == VIDEOS  # the work was done
    clip_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(out, "clips"))
                     for f in files)
    index = write_shards(os.path.join(out, "pretrain.jsonl"), os.path.join(out, "clips"), str(tmp_path / "shards"),
                         progress=False)
    shard_bytes = sum(s["bytes"] for s in index["shards"])
    frames = VIDEOS * CLIPS * int(round(CLIP_SECONDS * 3))
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        case=tag, cores=1, clips=VIDEOS * CLIPS, samples=VIDEOS, clip_seconds=CLIP_SECONDS, source_fps=SRC_FPS,
        clips_per_s=VIDEOS * CLIPS / mean, samples_per_s=VIDEOS / mean,
        source_seconds_per_s=VIDEOS * CLIPS * CLIP_SECONDS / mean,
        clip_bytes_per_sample=clip_bytes / VIDEOS, shard_bytes_per_sample=shard_bytes / VIDEOS,
        gb_per_1000_samples=shard_bytes / VIDEOS * 1000 / 1e9, bytes_per_frame=clip_bytes / frames)
    print(json.dumps(benchmark.extra_info))
