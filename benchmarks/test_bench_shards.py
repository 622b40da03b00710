"""The shard reader (`data.kind: shards`, lfvila_model/data/shard_stream.py) on one CPU core: pre-training items/s
read from WebDataset tar shards (tar read, shuffle buffer, clips decoded from memory, train transform), against
the same items from clip files (`PretrainDataset`), measured in the same run.

    pytest benchmarks/test_bench_shards.py
    LFVILA_BENCH_ROUNDS=1 LFVILA_BENCH_SHARD_ITEMS=4 pytest benchmarks/test_bench_shards.py   # quick look

Cases (one pytest-benchmark group per resolution; `extra_info["items_per_s"]`), the process pinned to one core
and torch on one thread while they run: an item is 4 consecutive clips of h264 (veryfast, B-frames) at 3 fps, 40
frames each, 8 frames taken per clip, train transform to 192x320 (as `benchmarks/test_bench_data.py`), no
tokenizer; `360p` (640x360) and `720p` (1280x720) clips. The shards hold 2 x 16 samples (the 4 clips encoded once,
repeated), shuffle buffer 16. Environment knobs: LFVILA_BENCH_ROUNDS (default 3), LFVILA_BENCH_SHARD_ITEMS (items
per round, default 8). Benchmarks measure; they assert nothing about speed.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch

ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "3"))
ITEMS = int(os.environ.get("LFVILA_BENCH_SHARD_ITEMS", "8"))
SIZE = (192, 320)
CLIPS, CLIP_FRAMES, CLIP_FPS, FRAMES_PER_CLIP = 4, 40, 3, 8
SHARDS, PER_SHARD, BUFFER = 2, 16, 16
RESOLUTIONS = {"360p": (360, 640), "720p": (720, 1280)}


def _clip(path: str, h: int, w: int, seed: int) -> None:
    """A clip of moving texture (every frame differs, as in real video), libx264 veryfast with B-frames."""
    import av

    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 255, (h // 8 + 8, w // 8 + 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    c = av.open(path, "w", format="mp4")
    s = c.add_stream("libx264", rate=CLIP_FPS)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "veryfast", "crf": "23", "x264-params": "bframes=3"}
    for i in range(CLIP_FRAMES):
        img = np.ascontiguousarray(tex[i % 8:i % 8 + h, (3 * i) % 64:(3 * i) % 64 + w])
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.fixture(scope="session")
def sets(tmp_path_factory):
    """{resolution: (shard folder, clip root, samples)}: the same clips as tar shards and as clip files."""
    import webdataset as wds

    from lfvila_model.data import annotations as ann

    out = {}
    for tag, (h, w) in RESOLUTIONS.items():
        base = tmp_path_factory.mktemp(f"shards_{tag}")
        data = []
        for m in range(CLIPS):
            path = str(base / f"c{m}.mp4")
            _clip(path, h, w, seed=m)
            with open(path, "rb") as f:
                data.append(f.read())
        shard_dir, clip_root = base / "shards", base / "clips"
        shard_dir.mkdir()
        entries, samples, n = [], [], 0
        for s in range(SHARDS):
            name = f"shard-{s:06d}.tar"
            with wds.TarWriter(str(shard_dir / name), encoder=False) as tw:
                for _ in range(PER_SHARD):
                    vid = f"v{n:05d}"
                    ids = [f"{vid}.{m}.mp4" for m in range(CLIPS)]
                    texts = [f"sentence {m}." for m in range(CLIPS)]
                    sample = {"__key__": f"s{n:09d}",
                              "json": json.dumps({"video_id": vid, "clips": ids, "texts": texts}).encode()}
                    for m in range(CLIPS):
                        sample[f"clip{m:03d}.mp4"] = data[m]
                        p = ann.clip_video_path(str(clip_root), ids[m])
                        os.makedirs(os.path.dirname(p), exist_ok=True)
                        with open(p, "wb") as f:
                            f.write(data[m])
                    tw.write(sample)
                    samples.append(ann.PretrainSample(tuple(ann.ClipText(c, t) for c, t in zip(ids, texts))))
                    n += 1
            entries.append({"name": name, "samples": PER_SHARD, "bytes": os.path.getsize(shard_dir / name)})
        with open(shard_dir / "index.json", "w") as f:
            json.dump({"format": "lfvila-shards", "version": 1, "total": n, "shards": entries}, f)
        out[tag] = (str(shard_dir), str(clip_root), samples)
    return out


@contextlib.contextmanager
def _one_core():
    cpus = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)


PARAMS = [(r, impl) for r in RESOLUTIONS for impl in ("files", "shards")]


@pytest.mark.parametrize("res,impl", PARAMS, ids=[f"{r}-{i}" for r, i in PARAMS])
def test_shard_reader_throughput(benchmark, sets, res, impl):
    from lfvila_model.data.datasets import PretrainDataset
    from lfvila_model.data.shard_stream import ShardStream

    shard_dir, clip_root, samples = sets[res]
    common = dict(num_clips=CLIPS, frames_per_clip=FRAMES_PER_CLIP, size=SIZE, seed=0)
    if impl == "shards":
        stream = ShardStream(shard_dir, None, shuffle_buffer=BUFFER, **common)
        raw = stream.raw_samples(0, 0, 1)  # one slot reading both shards, over and over

        def read():
            return [stream.item(next(raw)) for _ in range(ITEMS)]
    else:
        ds = PretrainDataset(samples, clip_root, None, train=True, **common)
        pos = iter(range(10 ** 9))

        def read():
            return [ds[next(pos) % len(ds)] for _ in range(ITEMS)]

    benchmark.group = f"shard reader {res} one core"
    benchmark.extra_info.update(resolution=res, backend=impl, size=list(SIZE), cores=1, items_per_round=ITEMS)
    with _one_core():
        first = read()
        assert all(not it.get("skipped") for it in first)
        benchmark.pedantic(read, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["items_per_s"] = ITEMS / benchmark.stats.stats.mean
