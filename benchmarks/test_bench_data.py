"""Training input on the CPU: items/s of the project's datasets on one core against a naive decoder, and the
end-to-end effect of DataLoader workers on a training step.

    pytest benchmarks/test_bench_data.py
    LFVILA_BENCH_DATA_LONG_SECONDS=20 LFVILA_BENCH_ROUNDS=1 pytest benchmarks/test_bench_data.py   # quick look

Item cases (one pytest-benchmark group each; `extra_info["items_per_s"]`), the process pinned to one core and
torch on one thread while they run:
- `pretrain-720p`: a pre-training item (`PretrainDataset`, train transform to 192x320) from 4 consecutive clips
  of 1280x720 h264 at 3 fps, 40 frames each, 8 frames per clip (32 in all);
- `pretrain-360p`: the same from 640x360 clips;
- `retrieval-720p-long`: a retrieval item (`RetrievalDataset`, 32 frames with the train jitter) from a 2-minute
  1280x720 video at 25 fps with a keyframe every 2 s.
Each against `naive`, measured in the same run: decode every frame of the file to RGB, index the wanted ones,
stack, transform (the same transform; for the 2-minute video the 3000 RGB frames are not stacked first, which
would take 8 GB, so the naive figure there is a little kind to the baseline).

`test_train_step_workers`: `lfvila-tiny` stage-1 pre-training at batch 2 on the 720p clips, one torch thread,
with 0 and 2 DataLoader workers: seconds per step and data fraction (from metrics.jsonl, the first 2 steps left
out as start-up) in extra_info, and the final weights of the two runs must be bitwise equal.

The videos are encoded here with PyAV (libx264 veryfast, B-frames) once per session. Environment knobs:
LFVILA_BENCH_ROUNDS (default 3 items per case), LFVILA_BENCH_DATA_LONG_SECONDS (default 120),
LFVILA_BENCH_DATA_STEPS (default 8 training steps per run). Benchmarks measure; they assert nothing about speed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks.pinning import one_core

ROUNDS = int(os.environ.get("LFVILA_BENCH_ROUNDS", "3"))
LONG_SECONDS = int(os.environ.get("LFVILA_BENCH_DATA_LONG_SECONDS", "120"))
STEPS = int(os.environ.get("LFVILA_BENCH_DATA_STEPS", "8"))
SIZE = (192, 320)
CLIPS, CLIP_FRAMES, CLIP_FPS, FRAMES_PER_CLIP = 4, 40, 3, 8
LONG_FPS, LONG_KEYINT, LONG_FRAMES = 25, 50, 32


def _content(n: int, h: int, w: int, seed: int):
    """Frames of a panning texture with a moving block and light noise: every frame differs, as in real video."""
    rng = np.random.default_rng(seed)
    tex = np.kron(rng.integers(0, 255, (h // 16 + 2, w // 8 + 2, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    noise = rng.integers(0, 12, (4, h, w, 3), dtype=np.uint8)
    for i in range(n):
        y, x = (2 * i) % 16, (5 * i) % (tex.shape[1] - w)
        img = tex[y:y + h, x:x + w].copy()
        by, bx = (7 * i) % (h - h // 4), (11 * i) % (w - w // 4)
        img[by:by + h // 4, bx:bx + w // 4] = (37 * i) % 256
        img += noise[i % 4]
        yield img


def _encode(path: str, n: int, h: int, w: int, fps: int, keyint: int, seed: int) -> None:
    import av

    tmp = path + ".tmp.mp4"
    c = av.open(tmp, "w", format="mp4")
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={keyint}:min-keyint={keyint}:bframes=3"}
    for img in _content(n, h, w, seed):
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """{"720p": (root, sample), "360p": (root, sample), "long": (root, record)}, encoded once per session."""
    from lfvila_model.data import annotations as ann

    base = tmp_path_factory.mktemp("bench_data")
    out = {}
    for tag, (h, w) in {"720p": (720, 1280), "360p": (360, 640)}.items():
        root = base / tag
        (root / "vid").mkdir(parents=True)
        clips = []
        for m in range(CLIPS):
            cid = f"vid.{m}.mp4"
            _encode(ann.clip_video_path(str(root), cid), CLIP_FRAMES, h, w, CLIP_FPS, 250, seed=m)
            clips.append(ann.ClipText(cid, f"sentence {m} of the paragraph."))
        out[tag] = (str(root), ann.PretrainSample(tuple(clips)))
    root = base / "long"
    root.mkdir()
    _encode(str(root / "long.mp4"), LONG_SECONDS * LONG_FPS, 720, 1280, LONG_FPS, LONG_KEYINT, seed=9)
    out["long"] = (str(root), ann.RetrievalRecord("long", ("one.", "two.", "three.", "four.")))
    return out


def _naive_frames(path: str, choose) -> np.ndarray:
    """Every frame decoded to RGB, then the chosen ones."""
    import av

    c = av.open(path)
    try:
        allf = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    finally:
        c.close()
    return np.stack([allf[i] for i in choose(len(allf))])


def _naive_pretrain(root, sample):
    from lfvila_model.data import annotations as ann
    from lfvila_model.data.video import clip_segment_indices, train_transform

    def item(rng):
        parts = [_naive_frames(ann.clip_video_path(root, c.clip_id),
                               lambda n: clip_segment_indices(n, FRAMES_PER_CLIP)) for c in sample.clips]
        return train_transform(np.concatenate(parts), SIZE, rng)

    return item


def _naive_retrieval(root, record):
    from lfvila_model.data.video import downstream_indices, train_transform

    def item(rng):
        frames = _naive_frames(os.path.join(root, record.clip_id + ".mp4"),
                               lambda n: downstream_indices(n, LONG_FRAMES, True, rng))
        return train_transform(frames, SIZE, rng)

    return item


def _ours(case, videos):
    from lfvila_model.data.datasets import PretrainDataset, RetrievalDataset

    if case.startswith("pretrain"):
        root, sample = videos[case.split("-")[1]]
        ds = PretrainDataset([sample], root, None, num_clips=CLIPS, frames_per_clip=FRAMES_PER_CLIP, size=SIZE,
                             train=True)
    else:
        root, record = videos["long"]
        ds = RetrievalDataset([record], root, None, num_frames=LONG_FRAMES, size=SIZE, train=True)
    return lambda rng: ds[0]


CASES = ["pretrain-720p", "pretrain-360p", "retrieval-720p-long"]
PARAMS = [(c, impl) for c in CASES for impl in ("naive", "ours")]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_item_throughput(benchmark, videos, case, impl):
    if impl == "ours":
        item = _ours(case, videos)
    elif case.startswith("pretrain"):
        item = _naive_pretrain(*videos[case.split("-")[1]])
    else:
        item = _naive_retrieval(*videos["long"])
    rng = np.random.default_rng(0)
    benchmark.group = f"data item {case} one core"
    benchmark.extra_info.update(case=case, backend=impl, size=list(SIZE), cores=1)
    with one_core():
        out = item(rng)
        assert out is not None and not (isinstance(out, dict) and out.get("skipped"))
        benchmark.pedantic(item, args=(rng,), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["items_per_s"] = 1.0 / benchmark.stats.stats.mean


_TRAINED: dict = {}


@pytest.mark.parametrize("workers", [0, 2])
def test_train_step_workers(benchmark, videos, tmp_path, workers):
    from lfvila_model import build_model, get_config
    from lfvila_model.data.datasets import PretrainDataset
    from lfvila_model.data.text import ParagraphTokenizer
    from lfvila_model.train.loop import TrainConfig, Trainer
    from lfvila_model.train.tasks import PretrainTask

    mc = get_config("lfvila-tiny")
    root, sample = videos["720p"]
    tok = ParagraphTokenizer(num_sentences=mc.num_clips, max_length=mc.max_sentence_len)
    data = PretrainDataset([sample] * 8, root, tok, num_clips=mc.num_clips,
                           frames_per_clip=mc.video.num_frames // mc.num_clips, size=tuple(mc.video.input_size),
                           train=True, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}

    def run():
        torch.manual_seed(0)
        model = build_model(mc)
        cfg = TrainConfig(out_dir=str(tmp_path / f"w{workers}"), max_steps=STEPS, batch_size=2, lr=1e-4,
                          warmup_steps=1, progress=False, tensorboard=False, log_every=1, seed=0, device="cpu")
        t = Trainer(model, PretrainTask(mc), data, cfg, num_workers=workers, prefetch=2)
        t.fit()
        result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
            result["metrics"] = [json.loads(x) for x in f if x.strip()]

    benchmark.group = "data train step lfvila-tiny 720p clips B=2 one torch thread"
    benchmark.extra_info.update(workers=workers, backend=f"workers={workers}", steps=STEPS)
    try:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    rec = [r for r in result["metrics"] if "train/seconds_per_step" in r][2:]
    if rec:
        benchmark.extra_info["seconds_per_step"] = float(np.mean([r["train/seconds_per_step"] for r in rec]))
        benchmark.extra_info["data_fraction"] = float(np.mean([r["train/data_fraction"] for r in rec]))
    _TRAINED[workers] = result["params"]
    if len(_TRAINED) == 2:  # the worker count never changes the result
        a, b = _TRAINED[0], _TRAINED[2]
        assert all(torch.equal(a[k], b[k]) for k in a)
