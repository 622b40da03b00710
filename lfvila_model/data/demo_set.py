"""The embedded demo set: synthetic long-form videos with one sentence per clip, rendered as real mp4 files.

Each video has 4 clips; each clip shows one *event* on a noisy grey background: an object of one of 6 colours and
3 shapes that moves left/right/up/down, appears, grows, or turns into one of the 5 other colours
(6 x 3 x 11 = 198 events, one generated sentence each). Every event set (4 distinct events) is rendered in two
different orders, independently (own positions, sizes and noise), and both renderings land in the same split: the
same sentences in another order are always among the retrieval candidates, so a model must align clips and
sentences in time, not just recognise the bag of events. Event sets are distinct across the whole set (no
validation set occurs in training).

Layout written under ``out_dir`` (the official formats of spec 5, so the real readers and datasets are used)::

    train.jsonl, val.jsonl       pre-training format: one list of 4 {clip_id, text} per line
    val_retrieval.jsonl          retrieval format: {clip_id: <video id>, text: [4 sentences]}
    clips/<vid>/<vid>.<m>.mp4    clip m of video <vid> (pre-training path rule <root>/<id up to '.'>/<clip_id>)
    videos/<vid>.mp4             whole validation videos (retrieval path rule <root>/<clip_id>.mp4)
    meta.json                    parameters, vocabulary, per-video event ids and order

Reading the 4 clips with ``frames_per_clip`` frames each (pre-training sampling, eval window) and reading the
whole video with ``4 * frames_per_clip`` frames (eval retrieval sampling) give the same frames (two separate
encodes of identical pixels, so equal up to codec error). Clips are 3 fps, as the official HD-VILA clips.

The background is grey with blotchy noise (4x4-pixel cells, a new pattern and a slight tint per clip); object
position and size are random per clip. Files are mpeg4 by default (libx264 on request): for thousands of
4-frame files, x264's per-file start-up dominated the generation time.

Everything depends only on ``seed``: video v of a split is rendered from ``default_rng([seed, split, v])``, so
the output is identical for any number of workers. Both encoders run single-threaded without B-frames, which
makes the mp4 bytes themselves reproducible on one machine.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import time
from typing import Any, Sequence

import numpy as np

from . import annotations as ann

__all__ = ["COLOURS", "SHAPES", "EVENT_KINDS", "num_events", "event_sentence", "render_clip",
           "make_demo_data", "temporal_order_candidates"]

COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 230)),
    ("yellow", (240, 220, 40)),
    ("purple", (150, 60, 200)),
    ("cyan", (50, 215, 225)),
)
SHAPES = ("circle", "square", "triangle")
_MOTIONS = ("left", "right", "up", "down")
EVENT_KINDS = ("left", "right", "up", "down", "appear", "grow", "turn")  # "turn" has 5 targets -> 11 kinds
_KINDS_PER_OBJECT = 4 + 1 + 1 + (len(COLOURS) - 1)
_LAYOUT_VERSION = 1


def num_events() -> int:
    """Size of the event vocabulary: colours x shapes x (4 moves + appear + grow + 5 colour changes) = 198."""
    return len(COLOURS) * len(SHAPES) * _KINDS_PER_OBJECT


def _decode_event(e: int) -> tuple[int, int, str, int]:
    """Event id -> (colour, shape, kind, target colour or -1)."""
    if not 0 <= e < num_events():
        raise ValueError(f"event id must be in [0, {num_events()}), got {e}")
    obj, k = divmod(e, _KINDS_PER_OBJECT)
    colour, shape = divmod(obj, len(SHAPES))
    if k < 4:
        return colour, shape, _MOTIONS[k], -1
    if k == 4:
        return colour, shape, "appear", -1
    if k == 5:
        return colour, shape, "grow", -1
    others = [c for c in range(len(COLOURS)) if c != colour]
    return colour, shape, "turn", others[k - 6]


def event_sentence(e: int) -> str:
    """The one sentence that describes event ``e``."""
    colour, shape, kind, target = _decode_event(e)
    obj = f"{COLOURS[colour][0]} {SHAPES[shape]}"
    if kind in ("left", "right"):
        return f"the {obj} moves to the {kind}."
    if kind in ("up", "down"):
        return f"the {obj} moves {kind}."
    if kind == "appear":
        return f"a {obj} appears."
    if kind == "grow":
        return f"the {obj} grows bigger."
    return f"the {obj} turns {COLOURS[target][0]}."


def _shape_mask(shape: int, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if SHAPES[shape] == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if SHAPES[shape] == "square":
        s = 0.85 * r  # a square of the same visual weight as the circle
        return (np.abs(xx - cx) <= s) & (np.abs(yy - cy) <= s)
    # upward triangle: apex at the top, half-width growing linearly to r at the base
    top, bottom = cy - r, cy + r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= 0.5 * (yy - top))


def render_clip(event: int, frames: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Renders one clip of event ``event``: ``uint8 (frames, H, W, 3)``.

    Position and size are random; the object stays inside the central 80 % of the frame so that the eval
    transform's centre crop (90 %) never cuts it. Appearing and colour changes happen at the clip's midpoint.
    """
    h, w = size
    colour, shape, kind, target = _decode_event(event)
    scale = min(h, w)
    r = scale * rng.uniform(0.11, 0.17)
    # the motion covers a fixed fraction of the frame, so direction is readable at any size
    dx = {"left": -1, "right": 1}.get(kind, 0) * 0.35 * w
    dy = {"up": -1, "down": 1}.get(kind, 0) * 0.35 * h
    grow = 1.7 if kind == "grow" else 1.0
    rmax = r * grow
    lo_x, hi_x = 0.1 * w + rmax, 0.9 * w - rmax
    lo_y, hi_y = 0.1 * h + rmax, 0.9 * h - rmax
    cx0 = rng.uniform(lo_x + max(0.0, -dx), hi_x - max(0.0, dx))
    cy0 = rng.uniform(lo_y + max(0.0, -dy), hi_y - max(0.0, dy))
    yy, xx = _grid(h, w)
    # background: grey with blotchy noise (4x4-pixel cells, a new pattern per clip, fixed within the clip).
    # Static, cell-sized noise keeps the mp4s small and fast to encode; per-pixel per-frame noise made x264
    # 10x larger and slower without making the task any more realistic.
    cells = rng.normal(0.0, 16.0, size=(-(-h // 4), -(-w // 4), 1)) + rng.normal(0.0, 5.0, size=(1, 1, 3))
    bg = np.clip(128.0 + np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:h, :w], 0, 255).astype(np.uint8)
    out = np.empty((frames, h, w, 3), dtype=np.uint8)
    for k in range(frames):
        t = k / (frames - 1) if frames > 1 else 1.0
        second_half = k >= frames / 2
        img = bg.copy()
        visible = not (kind == "appear" and not second_half)
        if visible:
            col = COLOURS[target if (kind == "turn" and second_half) else colour][1]
            m = _shape_mask(shape, cx0 + dx * t, cy0 + dy * t, r * (1.0 + (grow - 1.0) * t), yy, xx)
            img[m] = col
        out[k] = img
    return out


_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each ``float32 (h, w)``, built once per size."""
    if (h, w) not in _GRIDS:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        _GRIDS[(h, w)] = (yy, xx)
    return _GRIDS[(h, w)]


# ----------------------------------------------------------------------------------------------------------------
# generation


def _sample_event_sets(n_sets: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    seen: set[frozenset] = set()
    sets = []
    while len(sets) < n_sets:
        s = tuple(int(e) for e in rng.choice(num_events(), size=4, replace=False))
        key = frozenset(s)
        if key in seen:
            continue
        seen.add(key)
        sets.append(s)
    return sets


def _two_orders(s: tuple[int, ...], rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    a = tuple(s[i] for i in rng.permutation(len(s)))
    while True:
        b = tuple(s[i] for i in rng.permutation(len(s)))
        if b != a:
            return a, b


def _render_video(job: tuple) -> int:
    """Worker: renders and writes the clips (and optionally the whole video) of one video; returns bytes."""
    from .video import write_video

    seed, split_code, v, vid, events, frames_per_clip, size, clip_root, full_root, codec = job
    rng = np.random.default_rng([seed, split_code, v])
    clips = [render_clip(e, frames_per_clip, size, rng) for e in events]
    d = os.path.join(clip_root, vid)
    os.makedirs(d, exist_ok=True)
    nbytes = 0
    for m, c in enumerate(clips):
        p = os.path.join(d, f"{vid}.{m}.mp4")
        write_video(p, c, fps=3, codec=codec)
        nbytes += os.path.getsize(p)
    if full_root is not None:
        p = os.path.join(full_root, f"{vid}.mp4")
        write_video(p, np.concatenate(clips), fps=3, codec=codec)
        nbytes += os.path.getsize(p)
    return nbytes


def _pick_codec(codec: str | None) -> str:
    import av

    if codec is None:
        # mpeg4 by default: for 4-frame clips x264's per-file start-up (~10 ms) dominated the generation time
        codec = "mpeg4" if "mpeg4" in av.codecs_available else "libx264"
    if codec not in ("mpeg4", "libx264"):
        raise ValueError(f"codec must be 'mpeg4', 'libx264' or None, got {codec!r}")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not available in this PyAV build")
    return codec


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def make_demo_data(out_dir: str | os.PathLike, num_train: int = 2000, num_val: int = 200, seed: int = 0,
                   frames_per_clip: int = 4, size: tuple[int, int] = (64, 96), workers: int | None = None,
                   force: bool = False, progress: bool = True, codec: str | None = None) -> dict[str, Any]:
    """Generates the demo video-paragraph set under ``out_dir`` (layout in the module docstring).

    Args:
        num_train, num_val: videos per split (even: each event set is rendered in 2 orders).
        seed: everything is a function of it.
        frames_per_clip: frames rendered per clip (4 clips per video).
        size: ``(height, width)``, even (yuv420p).
        workers: processes (default: min(2, CPUs)); 1 renders in this process.
        force: regenerate even if ``out_dir/meta.json`` says the same set is already there.
        codec: ``'mpeg4'`` (default when available: fastest for many tiny files) or ``'libx264'``.
    Returns: a summary dict (paths, counts, seconds, bytes) that is also stored in ``meta.json``.
    """
    num_train = _check_int("num_train", num_train, 2)
    num_val = _check_int("num_val", num_val, 2)
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if v % 2:
            raise ValueError(f"{name} must be even (each event set is rendered in 2 orders), got {v}")
    seed = _check_int("seed", seed, 0)
    frames_per_clip = _check_int("frames_per_clip", frames_per_clip, 1)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s >= 16 and s % 2 == 0 for s in size)):
        raise ValueError(f"size must be (height, width), even integers >= 16, got {size!r}")
    size = (int(size[0]), int(size[1]))
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = _check_int("workers", workers, 1)
    n_sets = (num_train + num_val) // 2
    if n_sets > 10_000_000:
        raise ValueError(f"num_train + num_val too large for distinct event sets, got {num_train + num_val}")

    out_dir = os.fspath(out_dir)
    params = {"layout_version": _LAYOUT_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
              "frames_per_clip": frames_per_clip, "size": list(size), "codec": _pick_codec(codec)}
    meta_path = os.path.join(out_dir, "meta.json")
    if not force and os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("params") == params:
            return meta["summary"]

    t0 = time.perf_counter()
    clip_root = os.path.join(out_dir, "clips")
    full_root = os.path.join(out_dir, "videos")
    os.makedirs(clip_root, exist_ok=True)
    os.makedirs(full_root, exist_ok=True)
    codec = _pick_codec(codec)

    # event sets and orders come from one stream seeded by `seed` alone; rendering has its own per-video streams
    rng = np.random.default_rng([seed, 1000])
    sets = _sample_event_sets(n_sets, rng)
    split_sets = {"train": sets[: num_train // 2], "val": sets[num_train // 2:]}
    videos: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    jobs = []
    for split_code, split in enumerate(("train", "val")):
        for si, s in enumerate(split_sets[split]):
            for oi, order in enumerate(_two_orders(s, rng)):
                v = 2 * si + oi
                vid = f"demo{split}{v:06d}"
                videos[split].append({"video_id": vid, "set": si, "events": list(order)})
                jobs.append((seed, split_code, v, vid, order, frames_per_clip, size, clip_root,
                             full_root if split == "val" else None, codec))

    from tqdm.auto import tqdm

    from . import video  # noqa: F401  imported before forking, so workers do not each import torch and PyAV

    total_bytes = 0
    bar = tqdm(total=len(jobs), desc="rendering demo videos", unit="video", disable=not progress)
    if workers == 1:
        for j in jobs:
            total_bytes += _render_video(j)
            bar.update(1)
    else:
        # fork keeps start-up cheap (no re-import); each job is independent and seeded, so order is irrelevant
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for nb in pool.imap_unordered(_render_video, jobs, chunksize=16):
                total_bytes += nb
                bar.update(1)
    bar.close()

    def pretrain_rows(split: str) -> list[list[dict[str, str]]]:
        return [[{"clip_id": f"{v['video_id']}.{m}.mp4", "text": event_sentence(e)}
                 for m, e in enumerate(v["events"])] for v in videos[split]]

    paths = {"train": os.path.join(out_dir, "train.jsonl"), "val": os.path.join(out_dir, "val.jsonl"),
             "val_retrieval": os.path.join(out_dir, "val_retrieval.jsonl")}
    ann.write_jsonl(paths["train"], pretrain_rows("train"))
    ann.write_jsonl(paths["val"], pretrain_rows("val"))
    ann.write_jsonl(paths["val_retrieval"], [{"clip_id": v["video_id"],
                                              "text": [event_sentence(e) for e in v["events"]]}
                                             for v in videos["val"]])
    seconds = time.perf_counter() - t0
    summary = {"out_dir": out_dir, **paths, "clip_root": clip_root, "video_root": full_root,
               "num_train": num_train, "num_val": num_val, "num_events": num_events(),
               "clips_per_video": 4, "frames_per_clip": frames_per_clip, "size": list(size), "codec": codec,
               "seconds": round(seconds, 2), "video_bytes": total_bytes, "workers": workers}
    meta = {"params": params, "summary": summary,
            "vocabulary": [event_sentence(e) for e in range(num_events())], "videos": videos}
    tmp = meta_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)  # written last: its presence means the set is complete
    return summary


def temporal_order_candidates(paragraphs: Sequence[Sequence[str]] | str | os.PathLike,
                              ) -> list[dict[str, Any]]:
    """For each video, its true paragraph and the same sentences in every other order.

    Args:
        paragraphs: the true paragraphs (lists of sentences, one per video), or a pre-training/retrieval jsonl
            path (``val.jsonl`` or ``val_retrieval.jsonl`` of the demo set).
    Returns: per video ``{"index", "candidates": [paragraph, ...], "true_index"}``. Candidates are all
    ``len(p)!`` orders (24 for 4 sentences) in ``itertools.permutations`` order, so the true one is index 0;
    scores should be compared with :func:`lfvila_model.eval.retrieval.temporal_order_score`, which counts a tie
    with another order as a failure, so an order-blind model scores 0 here.
    """
    if isinstance(paragraphs, (str, os.PathLike)):
        path = os.fspath(paragraphs)
        with open(path, encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
        if first.lstrip().startswith("["):
            paragraphs = [[c.text for c in s.clips] for s in ann.read_pretrain_jsonl(path)]
        else:
            paragraphs = [list(r.sentences) for r in ann.read_retrieval_jsonl(path)]
    out = []
    for i, p in enumerate(paragraphs):
        p = list(p)
        if not p or not all(isinstance(s, str) for s in p):
            raise ValueError(f"paragraphs[{i}] must be a non-empty list of strings, got {p!r:.80}")
        if len(set(p)) != len(p):
            raise ValueError(f"paragraphs[{i}] repeats a sentence, so its orders are not distinct: {p!r:.120}")
        if len(p) > 6:
            raise ValueError(f"paragraphs[{i}] has {len(p)} sentences; more than 6 gives over 720 orders")
        out.append({"index": i, "candidates": [[p[j] for j in perm] for perm in
                                               itertools.permutations(range(len(p)))], "true_index": 0})
    return out
