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

import os

import numpy as np
import pytest

from benchmarks.pinning import one_core

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
    """{resolution: (shard folder, clip root, samples)}: the same clips as clip files and, written by the
    project's own writer (`lfvila shard`, `data.shards.write_shards`), as tar shards."""
    from lfvila_model.data import annotations as ann
    from lfvila_model.data.shards import write_shards

    out = {}
    for tag, (h, w) in RESOLUTIONS.items():
        base = tmp_path_factory.mktemp(f"shards_{tag}")
        data = []
        for m in range(CLIPS):
            path = str(base / f"c{m}.mp4")
            _clip(path, h, w, seed=m)
            with open(path, "rb") as f:
                data.append(f.read())
        clip_root = base / "clips"
        samples = []
        for n in range(SHARDS * PER_SHARD):  # the 4 clips encoded once, copied under each sample's ids
            ids = [f"v{n:05d}.{m}.mp4" for m in range(CLIPS)]
            for m, cid in enumerate(ids):
                p = ann.clip_video_path(str(clip_root), cid)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(data[m])
            samples.append(ann.PretrainSample(tuple(ann.ClipText(c, f"sentence {m}.") for m, c in enumerate(ids))))
        jsonl = base / "pretrain.jsonl"
        ann.write_jsonl(jsonl, [[{"clip_id": c.clip_id, "text": c.text} for c in smp.clips] for smp in samples])
        write_shards(jsonl, clip_root, base / "shards", samples_per_shard=PER_SHARD, progress=False)
        out[tag] = (str(base / "shards"), str(clip_root), samples)
    return out


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
    with one_core():
        first = read()
        assert all(not it.get("skipped") for it in first)
        benchmark.pedantic(read, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["items_per_s"] = ITEMS / benchmark.stats.stats.mean
