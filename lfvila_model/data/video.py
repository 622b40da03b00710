"""Video decoding (PyAV), frame-index sampling and the train/eval transforms of LF-VILA (spec 4.2 and 5).

Layouts: decoded frames are ``uint8 (T, H, W, 3)`` RGB numpy arrays; transformed clips are
``float32 (3, T, H, W)`` tensors, ImageNet-normalised, as the video encoder takes them (one clip per batch element).

Frame indices:

- downstream (spec 4.2): ``linspace(start, end, F)`` over the whole video, cast to int (floor, as numpy's
  ``astype(int)`` does for non-negative values). Eval: start 0, end n-1. Train: ``interval = floor(n / (F-1))``,
  start ~ U{0..interval}, end ~ U{n-1-interval..n-1} (both inclusive; for F = 32 this is the official
  ``floor(n / 31)``).
- pre-training (spec 5): each clip gives ``k`` frames at the segment starts ``linspace(0, n, k+1)[:k]`` (floor).

Transforms (torch ops only, no torchvision), one random crop/flip shared by every frame of a video:

- train: RandomResizedCrop(size, scale 0.8-1.0, ratio 3/4-4/3, torchvision's sampling with 10 tries and a
  centre fallback) + horizontal flip with p = 0.5 (the official zero ColorJitter is a no-op and is left out).
  Bilinear resizing without antialias by default (what torchvision of the official code's time did on tensors).
- eval: Resize -> CenterCrop -> Resize, with the official 192x320 recipe (240x428 -> 216x385 -> 192x320) scaled
  proportionally for other target sizes.

A missing, truncated or undecodable file raises :class:`VideoReadError` (with ``.path`` and ``.reason``), the one
exception type the dataset layer catches to skip and count a bad video.

Sources: every decode function takes a path or a binary file-like object opened for reading (``io.BytesIO`` of an
mp4 read from a tar shard: decoded from memory, no temporary file). A file-like source is rewound before each
open; its ``name`` attribute, when it has one, names it in errors.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "VideoReadError",
    "import_av",
    "open_video",
    "source_name",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "write_video",
    "count_frames",
    "video_fps",
    "decode_frames",
    "decode_all_frames",
    "load_video",
    "FrameCache",
    "downstream_indices",
    "clip_segment_indices",
    "eval_sizes",
    "train_transform",
    "eval_transform",
    "frames_to_tensor",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoReadError(RuntimeError):
    """A video that cannot be used: missing, truncated or undecodable. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read video {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # picklable with its two fields, so it can cross process boundaries (pools, DataLoader workers)
        return (type(self), (self.path, self.reason))


# ----------------------------------------------------------------------------------------------------------------
# decoding


def import_av():
    """The `av` module (PyAV), or an ImportError that says how to install it."""
    try:
        import av  # noqa: WPS433 (imported lazily: only decoding needs PyAV)
    except ImportError:
        raise ImportError("video decoding needs PyAV: pip install av") from None
    return av


def _is_file_like(source) -> bool:
    return hasattr(source, "read") and hasattr(source, "seek")


def _source(source):
    """A path as ``str``, or the file-like object itself (see "Sources" above)."""
    return source if _is_file_like(source) else os.fspath(source)


def source_name(source) -> str:
    """How errors name ``source``: the path, or a file-like object's ``name`` (``"<memory>"`` without one)."""
    if _is_file_like(source):
        return str(getattr(source, "name", "<memory>"))
    return os.fspath(source)


def open_video(path):
    """An open PyAV container of `path` (a path or a binary file-like object, rewound first) with at least one
    video stream; `VideoReadError` (naming the source and why) when it is missing, cannot be opened or has no
    video."""
    av = import_av()
    name = source_name(path)
    if _is_file_like(path):
        path.seek(0)
    elif not os.path.isfile(path):
        raise VideoReadError(name, "file not found")
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(name, f"cannot open ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(name, "no video stream")
    return container


def _count_packets(path) -> int:
    av = import_av()
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size > 0)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(source_name(path), f"cannot demux ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def count_frames(path) -> int:
    """Number of frames of the first video stream (from the container header, else by demuxing packets)."""
    path = _source(path)
    container = open_video(path)
    try:
        n = int(container.streams.video[0].frames or 0)
    finally:
        container.close()
    if n <= 0:
        n = _count_packets(path)
    if n <= 0:
        raise VideoReadError(source_name(path), "video stream has no frames")
    return n


def video_fps(path) -> float | None:
    """Frame rate of the first video stream from the container header (average rate, else the guessed rate), or
    None when the header gives none (the caller then decides; How2QA span labels assume 3 fps, spec 5).

    Raises :class:`VideoReadError` when the file cannot be opened.
    """
    path = _source(path)
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        for rate in (stream.average_rate, stream.guessed_rate):
            if rate is not None and float(rate) > 0:
                return float(rate)
        return None
    finally:
        container.close()


def _decode(path, stop: int | None, keep: set[int] | None) -> tuple[dict[int, np.ndarray], int, int]:
    """Decodes frames 0..stop-1 (all if stop is None) in presentation order, in one open of the file.

    Returns ``(kept frames by index, frames decoded, frame count from the header or 0 when it has none)``.
    """
    av = import_av()
    container = open_video(path)
    kept: dict[int, np.ndarray] = {}
    i = 0
    try:
        stream = container.streams.video[0]
        header = int(stream.frames or 0)
        for frame in container.decode(stream):
            if keep is None or i in keep:
                kept[i] = frame.to_ndarray(format="rgb24")
            i += 1
            if stop is not None and i >= stop:
                break
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoReadError(source_name(path), f"decoding failed after {i} frames ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    return kept, i, header


class _NoSeek(Exception):
    """The seeking reader met something it cannot map exactly (irregular timestamps, a seek past the target):
    the caller decodes sequentially instead."""


def _frame_duration(stream) -> float | None:
    """Frame duration in the stream's time base for a constant-rate stream, else None."""
    rate = stream.average_rate or stream.guessed_rate
    if rate is None or float(rate) <= 0 or stream.time_base is None:
        return None
    return float(1 / (rate * stream.time_base))


def _decode_sparse(container, path, wanted: list[int], min_seek_gap: int | None) -> dict[int, np.ndarray]:
    """Frames ``wanted`` (sorted, distinct) of an open container, decoding no more than needed:

    - packets are fed to the decoder one by one; a packet whose frame is not wanted is decoded with
      ``skip_frame = NONREF``, so a non-reference frame (most B-frames) that nobody needs is not decoded at all
      (no other frame depends on it, so the rest decode bit for bit as in a full decode);
    - when the next wanted frame lies more than ``min_seek_gap`` frames past the last one decoded, it seeks to
      the keyframe before it and decodes forward from there (None: never seeks);
    - it stops at the last wanted frame.

    Frame i is the one with pts ``first_pts + i * frame_duration`` (``first_pts``: the first packet's, checked
    against the first frame out). A frame off that grid, out of order, or a wanted frame that never comes raises
    :class:`_NoSeek`: the caller then decodes sequentially, which defines the frame order.
    """
    av = import_av()
    kept: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        cc = stream.codec_context
        dur = _frame_duration(stream)
        if dur is None or dur <= 0:
            raise _NoSeek("no constant frame rate")
        want = set(wanted)
        pending = list(wanted)  # wanted frames not decoded yet, ascending
        first_pts = None

        def index_of(pts) -> int:
            pos = (pts - first_pts) / dur
            k = int(round(pos))
            if abs(pos - k) > 1e-3:
                raise _NoSeek(f"pts {pts} is off the constant-rate grid")
            return k

        seek_to = None  # frame index to seek to before the next pass
        back = 0  # frames before the target the seek aims at (grows when the keyframe found is past the target)
        last = -1  # highest frame index decoded
        while pending:
            if seek_to is not None:
                container.seek(int(round(first_pts + (seek_to - back) * dur)), backward=True, any_frame=False,
                               stream=stream)
                cc.flush_buffers()
            fresh = True  # the next frame out is the first of this pass
            prev = -1  # the pass's previous frame out
            restart = False
            for packet in container.demux(stream):
                if first_pts is None:
                    if packet.pts is None:
                        raise _NoSeek("packet without pts")
                    first_pts = packet.pts
                if packet.pts is not None and packet.size:
                    k = (packet.pts - first_pts) / dur
                    cc.skip_frame = "DEFAULT" if int(round(k)) in want else "NONREF"
                else:
                    cc.skip_frame = "DEFAULT"
                for frame in cc.decode(packet):
                    if frame.pts is None:
                        raise _NoSeek("frame without pts")
                    k = index_of(frame.pts)
                    if fresh:
                        fresh = False
                        if seek_to is None and k != 0:
                            raise _NoSeek(f"the first frame has the pts of frame {k}")
                        if seek_to is not None and k > pending[0]:
                            # mp4 seeks by decode time: with B-frames the keyframe found may present after the
                            # target; aim further back
                            back = max(2 * back, 4)
                            if pending[0] - back < 0:
                                raise _NoSeek(f"no keyframe found before frame {pending[0]}")
                            restart = True
                            break
                    elif k <= prev:
                        raise _NoSeek(f"frame {k} came after frame {prev}")
                    prev, last = k, max(last, k)
                    if k in want and k not in kept:
                        kept[k] = frame.to_ndarray(format="rgb24")
                if restart:
                    break
                while pending and pending[0] in kept:
                    pending.pop(0)
                if not pending:
                    break
                if pending[0] < last:
                    raise _NoSeek(f"frame {pending[0]} was not decoded")
                if (min_seek_gap is not None and last >= 0 and pending[0] - last > min_seek_gap
                        and pending[0] != seek_to):  # one seek per target: then decode forward to it
                    seek_to, back, restart = pending[0], 0, True
                    break
            else:
                if pending:
                    raise _NoSeek(f"the stream ended before frame {pending[0]}")
            if not restart:
                break
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise _NoSeek(f"{type(e).__name__}: {e}") from None
    return kept


def decode_all_frames(path) -> np.ndarray:
    """Decodes every frame. Returns ``uint8 (N, H, W, 3)`` RGB."""
    path = _source(path)
    kept, n, header = _decode(path, None, None)
    # indices elsewhere are chosen from the header count: fewer decodable frames means a truncated file
    if n < header:
        raise VideoReadError(source_name(path), f"truncated: header says {header} frames, only {n} decodable")
    if n == 0:
        raise VideoReadError(source_name(path), "video stream has no decodable frames")
    return np.stack([kept[i] for i in range(n)])


# Seeking pays once the gap to the next wanted frame is longer than the decode from a keyframe to a frame (half a
# group of pictures on average, 1 s at most for the prepared data) plus the seek itself; measured in
# docs/data-loading.md. Short clips (3 fps, tens of frames) never seek.
MIN_SEEK_GAP = 48


def decode_frames(path, indices: Sequence[int], *, min_seek_gap: int | None = MIN_SEEK_GAP
                  ) -> np.ndarray:
    """Decodes the frames at ``indices`` (any order, repeats allowed). Returns ``uint8 (len(indices), H, W, 3)``.

    Decodes no more than needed (see :func:`_decode_sparse`): up to the largest index only, without the
    non-reference frames nobody asked for, and, where the next needed frame lies more than ``min_seek_gap``
    frames ahead (long videos sampled sparsely), from the keyframe before it (None: never seeks). The frames are
    exactly those of a full sequential decode; a stream whose timestamps are not a constant-rate grid is decoded
    sequentially.
    """
    path = _source(path)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices must be non-empty")
    if min(idx) < 0:
        raise ValueError(f"indices must be >= 0, got min {min(idx)}")
    return _read_frames(path, lambda n: idx, min_seek_gap, count=False)[0]


def _read_frames(path, choose: Callable[[int], Sequence[int]], min_seek_gap: int | None,
                 count: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``choose(frame count)`` -> those frames, in one open of the file when the header gives the count."""
    container = open_video(path)
    kept = None
    try:
        n = int(container.streams.video[0].frames or 0)
        if count and n <= 0:
            n = count_frames(path)
        idx = np.asarray(choose(n), dtype=np.int64)
        if count and (idx.size == 0 or idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"chosen indices {idx.tolist()} out of range for {n} frames ({source_name(path)})")
        wanted = sorted(set(idx.tolist()))
        try:
            kept = _decode_sparse(container, path, wanted, min_seek_gap)
        except _NoSeek:
            kept = None
    finally:
        container.close()
    if kept is None:
        stop = int(idx.max()) + 1
        kept, decoded, _ = _decode(path, stop, set(idx.tolist()))
        if decoded < stop:
            raise VideoReadError(source_name(path), f"truncated: frame {stop - 1} requested, only {decoded} decodable")
    return np.stack([kept[i] for i in idx.tolist()]), idx


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 3, codec: str = "libx264",
                crf: int = 18) -> None:
    """Encodes ``uint8 (T, H, W, 3)`` RGB frames as an mp4 (yuv420p; H and W must be even).

    libx264 runs with the ultrafast preset, one thread and no B-frames, so the output bytes depend only on the
    frames (deterministic files for the demo set); ``codec='mpeg4'`` is the fallback for builds without x264.
    The file is written to a temporary name and renamed, so an interrupted run never leaves a half file.
    """
    av = import_av()
    path = os.fspath(path)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 (T, H, W, 3) array, got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"frames need T >= 1 and even H, W for yuv420p, got (T, H, W) = {(t, h, w)}")
    tmp = f"{path}.{os.getpid()}.tmp.mp4"
    container = av.open(tmp, mode="w", format="mp4")
    try:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": str(int(crf)), "threads": "1", "bframes": "0"}
        else:
            stream.thread_count = 1
            stream.bit_rate = 4_000_000  # high enough that small test/demo frames round-trip near-losslessly
        for i in range(t):
            vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    os.replace(tmp, path)


class FrameCache:
    """Caches whole decoded videos as ``uint8 (N, H, W, 3)``: in memory (``mode='memory'``) or as ``.npy``
    files under ``directory`` (``mode='disk'``, memory-mapped on read, shared by DataLoader workers and runs).

    Whole videos are cached (not the sampled frames) because train-time jitter picks new indices every epoch;
    this suits short videos (3 fps clips, the demo set). Disk entries are keyed by the absolute path, size and
    mtime of the source file, so a changed video is decoded again.
    """

    def __init__(self, mode: str = "memory", directory: str | os.PathLike | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk":
            if directory is None:
                raise ValueError("directory is required when mode='disk'")
            directory = os.fspath(directory)
            os.makedirs(directory, exist_ok=True)
        self.mode = mode
        self.directory = directory
        self._mem: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __getstate__(self):
        # picklable for DataLoader workers started by spawn/forkserver (each gets a copy of the memory entries)
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _disk_name(self, path: str) -> str:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
        return os.path.join(self.directory, hashlib.sha1(key).hexdigest() + ".npy")

    def get(self, path: str | os.PathLike) -> np.ndarray:
        """All frames of ``path``, decoded once. Raises :class:`VideoReadError` for a bad video (not cached)."""
        path = os.fspath(path)
        if self.mode == "memory":
            with self._lock:
                hit = self._mem.get(path)
            if hit is not None:
                self.hits += 1
                return hit
            frames = decode_all_frames(path)
            self.put(path, frames)  # read-only from here: items share it, nobody may modify it in place
            return frames
        if not os.path.isfile(path):
            raise VideoReadError(path, "file not found")
        name = self._disk_name(path)
        if os.path.isfile(name):
            self.hits += 1
            return np.load(name, mmap_mode="r")
        frames = decode_all_frames(path)
        self.put(path, frames)  # atomic rename: a concurrent reader sees either nothing or the whole file
        return frames

    def put(self, path: str | os.PathLike, frames: np.ndarray) -> None:
        """Stores already-decoded frames for ``path`` (used by parallel preloading)."""
        path = os.fspath(path)
        if self.mode == "memory":
            frames.setflags(write=False)
            with self._lock:
                self._mem[path] = frames
        else:
            name = self._disk_name(path)
            tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp.npy"
            np.save(tmp, frames)
            os.replace(tmp, name)
        self.misses += 1

    def __len__(self) -> int:
        if self.mode == "memory":
            return len(self._mem)
        return sum(1 for f in os.listdir(self.directory) if f.endswith(".npy") and ".tmp" not in f)


def load_video(path, choose: Callable[[int], Sequence[int]],
               cache: FrameCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads the frames chosen by ``choose(num_frames)`` (a function of the video length, so the sampling is
    decided from the real frame count). Returns ``(frames uint8 (T, H, W, 3), indices int64 (T,))``.

    ``path``: a path, or a binary file-like object (decoded from memory; never cached: the cache is keyed by
    path). Without a cache the file is opened once (the header's frame count, then :func:`decode_frames`'
    decoding of only what is needed)."""
    path = _source(path)
    if cache is not None and not _is_file_like(path):
        allf = cache.get(path)
        idx = np.asarray(choose(len(allf)), dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(allf):
            raise ValueError(f"chosen indices {idx.tolist()} out of range for {len(allf)} frames ({path})")
        return np.ascontiguousarray(allf[idx]), idx
    return _read_frames(path, choose, MIN_SEEK_GAP)


# ----------------------------------------------------------------------------------------------------------------
# frame-index sampling


def _check_count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def downstream_indices(num_video_frames: int, num_frames: int, train: bool,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Downstream sampling (spec 4.2): ``int(linspace(start, end, num_frames))`` over the whole video.

    Args:
        num_video_frames: n, frames in the video (>= 1).
        num_frames: F, frames to sample (32 officially).
        train: jitter the ends (start ~ U{0..interval}, end ~ U{n-1-interval..n-1}, interval = n // (F-1));
            eval uses start 0, end n-1.
        rng: numpy Generator for the jitter (required when ``train``).
    Returns: int64 ``(F,)``, non-decreasing, in [0, n-1] (frames repeat when n < F).
    """
    n = _check_count("num_video_frames", num_video_frames)
    f = _check_count("num_frames", num_frames)
    start, end = 0, n - 1
    if train:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator when train=True, got {type(rng).__name__}")
        interval = n // max(f - 1, 1)
        start = int(rng.integers(0, interval, endpoint=True))
        end = int(rng.integers(max(n - 1 - interval, 0), n - 1, endpoint=True))
        # interval <= n/(F-1) keeps start <= end for F >= 3; the clamp covers F <= 2 and tiny videos
        start = min(start, n - 1)
        end = max(end, start)
    return np.linspace(start, end, f).astype(np.int64)


def clip_segment_indices(num_video_frames: int, frames_per_clip: int) -> np.ndarray:
    """Pre-training sampling (spec 5): ``int(linspace(0, n, k+1)[:k])``, the start of each of k equal segments.

    Returns int64 ``(k,)`` in [0, n-1] (officially k = 8 for 32 frames over 4 clips).
    """
    n = _check_count("num_video_frames", num_video_frames)
    k = _check_count("frames_per_clip", frames_per_clip)
    return np.linspace(0, n, k + 1)[:k].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# transforms


def _check_size(size) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be (height, width) positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _as_uint8_tensor(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or tensor, got {type(frames).__name__}")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame")
    # (T, 3, H, W) view of (T, H, W, 3) memory: channels_last, which is what the fast uint8 resize kernel takes
    return frames.permute(0, 3, 1, 2)


def frames_to_tensor(frames) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` (numpy or torch) -> ``float32 (T, 3, H, W)`` in [0, 1]."""
    return _as_uint8_tensor(frames).float().div_(255.0).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``(T, 3, H, W)`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _finish(x8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, 3, h, w)`` -> normalised float32 ``(3, T, h, w)``, contiguous."""
    # one fused pass: x / (255 std) - mean / std, promoting uint8 to float32 on the fly
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1, 1)
    return torch.addcmul(-shift, x8.permute(1, 0, 2, 3), scale).contiguous()


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Bilinear, align_corners=False, as torchvision's tensor Resize. Resizing stays in uint8 (torch's
    # channels-last kernels, ~8x faster than float32 here); the official pipeline resizes float frames, so a
    # pixel may differ by one rounding step (1/255) per resize.
    return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                         align_corners=False, antialias=antialias)


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling: ``(top, left, h, w)``, 10 tries, then a centre fallback."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(frames, size: tuple[int, int], rng: np.random.Generator, *,
                    scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    flip_p: float = 0.5, antialias: bool = False) -> torch.Tensor:
    """Train transform: one RandomResizedCrop box and one flip decision for all frames, then normalisation.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
        size: output ``(height, width)`` (192x320 officially).
        rng: numpy Generator (crop box and flip).
        antialias: antialiased downscaling. Default False: the official code resized tensors with a
            torchvision of 2022, which did not antialias tensors (antialias became the default in 0.17).
    Returns: ``float32 (3, T, height, width)``.
    """
    size = _check_size(size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
    x = _as_uint8_tensor(frames)
    top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], scale, ratio, rng)
    x = _resize(x[..., top:top + h, left:left + w], size, antialias)
    if rng.random() < flip_p:
        x = x.flip(-1)
    return _finish(x)


def eval_sizes(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resize, crop) sizes of the eval transform: the official 240x428 / 216x385 for 192x320, scaled
    proportionally (rounded half up) for other sizes."""
    h, w = _check_size(size)
    r = lambda v: int(math.floor(v + 0.5))  # noqa: E731 (half up; Python's round() is half-to-even)
    return (r(h * 240 / 192), r(w * 428 / 320)), (r(h * 216 / 192), r(w * 385 / 320))


def eval_transform(frames, size: tuple[int, int], *, antialias: bool = False) -> torch.Tensor:
    """Eval transform: Resize -> CenterCrop -> Resize (see :func:`eval_sizes`), then normalisation.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
        size: output ``(height, width)``.
        antialias: antialiased downscaling (default False, see :func:`train_transform`).
    Returns: ``float32 (3, T, height, width)``.
    """
    size = _check_size(size)
    (rh, rw), (ch, cw) = eval_sizes(size)
    x = _resize(_as_uint8_tensor(frames), (rh, rw), antialias)
    # torchvision CenterCrop offsets: int(round((H - h) / 2))
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    x = _resize(x[..., top:top + ch, left:left + cw], size, antialias)
    return _finish(x)
