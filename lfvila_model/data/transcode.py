"""Re-encoding videos with PyAV: one video to an H.264 mp4 at a fixed frame rate (and size), and a parallel,
resumable driver over many videos.

LF-VILA reads its videos at 3 fps (spec 5), so every raw download (any container PyAV opens, any frame rate
and size) is turned into ``<out>/<clip_id>.mp4`` at ``fps`` first; the datasets then decode small files.

Frame choice (the constant-frame-rate resampling ffmpeg's ``fps`` filter does): output frame k stands at time
``start + k / fps`` and shows the last source frame whose presentation time is at or before it (the first
frame for times before it). Output frames are written while ``start + k / fps`` is before the end, where the
end is the earliest of: the end of the last source frame, ``end``, ``start + max_seconds``. So a 4 s video at
3 fps gives 12 frames, and ``start``/``end`` cut frame-accurately. A ``start`` inside the video seeks to the
keyframe at or before it first (so cutting many short clips from one long video decodes each span once, not the
video from its beginning each time), then decodes forward; where the container cannot seek there or lands after
``start`` (a missing index, no start time), the video is decoded from its beginning instead: the frames written
are the same either way.

Size: ``short_side=S`` scales the shorter side to S and the other to keep the aspect ratio; both are rounded
to even numbers (yuv420p needs even sizes), so a 640x360 video with S = 224 becomes 398x224. Without
``short_side`` the size is kept, an odd side rounded down to even.

Only the first video stream is kept (no audio). An output is written to a temporary name in its folder and
renamed once complete: a file at the final name is always whole, which is what makes the driver resumable (an
existing output is never redone). An input that cannot be used raises
:class:`lfvila_model.data.video.VideoReadError` (``.path``, ``.reason``); the driver records it and goes on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Optional

from .video import VideoReadError, import_av, open_video

__all__ = ["TranscodeJob", "TranscodeResult", "transcode_video", "transcode_videos", "output_size", "default_workers",
           "temporary_name", "remove_stale_temporaries"]

# a frame stamped within this many seconds after an output time counts as at that time (pts round-off)
_TIME_EPS = 1e-6


def _check_positive(name: str, v, allow_none: bool = True) -> Optional[float]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number{' or None' if allow_none else ''}, got {v!r}")
    return float(v)


def _even(x: float) -> int:
    return max(2, 2 * int(math.floor(x / 2.0 + 0.5)))  # nearest even, halves up


def output_size(width: int, height: int, short_side: Optional[int] = None) -> tuple[int, int]:
    """``(width, height)`` of the output for a ``width x height`` source: the shorter side scaled to
    ``short_side`` (aspect kept), or the source size; both rounded to even (at least 2).

    Example: ``output_size(640, 360, 224) == (398, 224)``; ``output_size(63, 47) == (62, 46)``.
    """
    if short_side is None:
        return max(2, width - width % 2), max(2, height - height % 2)
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 2:
        raise ValueError(f"short_side must be an integer >= 2 or None, got {short_side!r}")
    if height <= width:
        return _even(width * short_side / height), _even(short_side)
    return _even(short_side), _even(height * short_side / width)


def temporary_name(dst: str | os.PathLike, pid: Optional[int] = None) -> str:
    """Where :func:`transcode_video` writes ``dst`` before renaming it: ``.<name>.<pid>.tmp.mp4`` beside it."""
    dst = os.fspath(dst)
    pid = os.getpid() if pid is None else pid
    return os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.{pid}.tmp.mp4")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # a process of another user (or an absurd number, which no process of ours wrote)
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Deletes the temporary outputs in ``folder`` left by a killed run (their process is gone on this machine);
    returns how many. Temporaries of running processes are kept."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp.mp4")):
            continue
        pid = name[: -len(".tmp.mp4")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def transcode_video(src: str | os.PathLike, dst: str | os.PathLike, *, fps: float = 3, short_side: Optional[int] = None,
                    max_seconds: Optional[float] = None, start: Optional[float] = None, end: Optional[float] = None,
                    crf: int = 23, preset: str = "veryfast", seek: bool = True) -> dict:
    """Re-encodes ``src`` to the mp4 ``dst`` (H.264, yuv420p, one encoder thread) at ``fps`` frames per second.

    Args:
        src: input video, any container and codec PyAV (FFmpeg) decodes.
        dst: output ``.mp4`` path; its folder must exist. Written under a temporary name, then renamed.
        fps: output frame rate (> 0).
        short_side: scale the shorter side to this many pixels (aspect kept, even sizes); None keeps the size.
        max_seconds: keep at most this many seconds from ``start`` (None: to the end).
        start, end: the span ``[start, end)`` of the source to keep, in seconds from its first frame (None: from
            the beginning / to the end); cuts are frame-accurate.
        crf, preset: libx264 quality (lower crf = better, 23 is x264's default) and speed preset.
        seek: jump to the keyframe at or before ``start`` instead of decoding from the beginning (the output is
            the same; False only for checking that).
    Returns:
        ``{"frames", "fps", "width", "height", "seconds", "source_size": [w, h]}`` of the output.
    Raises:
        VideoReadError: ``src`` is missing, cannot be opened or decoded, has no video stream, or has no frame in
            the span (nothing is left at ``dst`` then).
        ValueError: a bad option value.
    """
    av = import_av()
    src, dst = os.fspath(src), os.fspath(dst)
    rate = Fraction(_check_positive("fps", fps, allow_none=False)).limit_denominator(1001)
    max_seconds = _check_positive("max_seconds", max_seconds)
    t0 = 0.0 if start is None else float(start)
    if not math.isfinite(t0) or t0 < 0:
        raise ValueError(f"start must be a number >= 0 or None, got {start!r}")
    t_end = math.inf if end is None else float(end)
    if t_end <= t0:
        raise ValueError(f"end must be after start, got start={start!r}, end={end!r}")
    if max_seconds is not None:
        t_end = min(t_end, t0 + max_seconds)
    if short_side is not None:
        output_size(2, 2, short_side)  # checks the value before any file is touched

    container = open_video(src)
    tmp = temporary_name(dst)
    out = ostream = None
    k = 0  # output frames written; output frame k stands at t0 + k / rate
    held = None  # [source frame, its time, its converted copy or None]: shown at output times from its time on

    def emit_until(limit: float) -> None:
        """Writes the held frame at every output time before ``limit`` (and before the end)."""
        nonlocal k
        while t0 + k / rate < min(limit - _TIME_EPS, t_end):
            if held[2] is None:  # convert only frames that are shown: most are not when fps < the source's
                held[2] = held[0].reformat(width=ostream.width, height=ostream.height, format="yuv420p",
                                           interpolation="AREA")
                held[2].time_base = Fraction(1) / rate
                held[2].pict_type = av.video.frame.PictureType.NONE  # let x264 place its own keyframes
            held[2].pts = k
            for packet in ostream.encode(held[2]):
                out.mux(packet)
            k += 1

    try:
        stream = container.streams.video[0]
        src_rate = stream.average_rate or stream.guessed_rate
        step = 1.0 / float(src_rate) if src_rate else None  # a source frame's duration
        origin = None
        if stream.start_time is not None and stream.time_base is not None:
            origin = float(stream.start_time * stream.time_base)
        out = av.open(tmp, mode="w", format="mp4")
        sought = seek and t0 > 0 and origin is not None and bool(stream.time_base)
        if sought:
            try:  # the keyframe at or before t0 (pts in the stream's time base)
                target = stream.start_time + int(math.floor(Fraction(t0) / stream.time_base))
                container.seek(target, stream=stream, backward=True, any_frame=False)
            except (av.FFmpegError, OSError, ValueError, OverflowError):
                sought = False
                container.close()
                container = open_video(src)
                stream = container.streams.video[0]
        i = 0
        try:
            frames = container.decode(stream)
            while True:
                frame = next(frames, None)
                t = None if frame is None else frame.time
                if sought and i == 0 and (t is None or t - origin > t0 + _TIME_EPS):
                    # the seek landed after t0 (or found no frame, or lost the timestamps): decode from the
                    # beginning instead
                    sought = False
                    container.close()
                    container = open_video(src)
                    stream = container.streams.video[0]
                    frames = container.decode(stream)
                    continue
                if frame is None:
                    break
                if t is None:  # no timestamps: place frames by the stream's rate
                    t = i * (step or 1.0 / float(rate))
                if origin is None:
                    origin = t
                t -= origin
                i += 1
                if ostream is None:
                    w, h = output_size(frame.width, frame.height, short_side)
                    ostream = out.add_stream("libx264", rate=rate)
                    ostream.width, ostream.height, ostream.pix_fmt = w, h, "yuv420p"
                    ostream.options = {"preset": preset, "crf": str(int(crf)), "threads": "1"}
                    source_size = [frame.width, frame.height]
                if held is not None:
                    emit_until(t)
                    if step is None and t > held[1]:
                        step = t - held[1]
                if t0 + k / rate >= t_end:
                    break
                held = [frame, t, None]
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise VideoReadError(src, f"decoding failed after {i} frames ({type(e).__name__}: {e})") from None
        if held is None:
            raise VideoReadError(src, "video stream has no decodable frames")
        emit_until(held[1] + (step or 1.0 / float(rate)))  # the last frame lasts one source frame
        if k == 0:
            raise VideoReadError(src, f"no frame in the span [{t0:g} s, {t_end:g} s): the video ends at "
                                      f"{held[1]:.3f} s")
        for packet in ostream.encode():
            out.mux(packet)
        out.close()
        out = None
        os.replace(tmp, dst)
    finally:
        container.close()
        if out is not None:
            try:
                out.close()
            except Exception:  # noqa: BLE001 (the error that got us here matters, not the half file's)
                pass
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"frames": k, "fps": float(rate), "width": ostream.width, "height": ostream.height,
            "seconds": float(k / rate), "source_size": source_size}


# ----------------------------------------------------------------------------------------------------------------
# many videos


@dataclass(frozen=True)
class TranscodeJob:
    """One video to re-encode: ``src`` -> ``dst`` (an mp4 path), optionally only the span ``[start, end)`` s."""

    src: str
    dst: str
    start: Optional[float] = None
    end: Optional[float] = None


@dataclass
class TranscodeResult:
    """What :func:`transcode_videos` did: ``done`` outputs written now, ``existing`` outputs already there (not
    redone), ``failed`` ``{src: reason}`` of the inputs that could not be used (no output for them), and
    ``failed_outputs`` ``{dst: reason}`` of the jobs that wrote nothing (several jobs may cut one input)."""

    done: list = field(default_factory=list)
    existing: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    failed_outputs: dict = field(default_factory=dict)


def default_workers() -> int:
    """The CPUs this process may run on (one encoder thread per worker process)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _run_job(job: TranscodeJob, options: dict) -> tuple[TranscodeJob, Optional[str]]:
    """Worker body: ``(job, None)`` when written, ``(job, reason)`` when not. Never raises for a bad video."""
    try:
        transcode_video(job.src, job.dst, start=job.start, end=job.end, **options)
    except VideoReadError as e:
        return job, e.reason
    except Exception as e:  # noqa: BLE001 (one odd file must not stop a run over thousands)
        return job, f"{type(e).__name__}: {e}"
    return job, None


def transcode_videos(jobs: Iterable[TranscodeJob], *, fps: float = 3, short_side: Optional[int] = None,
                     max_seconds: Optional[float] = None, workers: Optional[int] = None, progress: bool = True,
                     desc: str = "re-encoding", unit: str = "video") -> TranscodeResult:
    """Runs :func:`transcode_video` over ``jobs`` in ``workers`` processes, with a tqdm progress bar.

    Resumable: a job whose ``dst`` exists is not redone (outputs appear only when complete, so an interrupted
    run leaves no half file; delete the outputs to redo them with other options); the temporaries a killed run
    left in the output folders are deleted (:func:`remove_stale_temporaries`). A bad video is recorded in
    ``failed`` and the others go on. Output folders are created.

    Args:
        jobs: the videos; two jobs may not write the same ``dst``.
        fps, short_side, max_seconds: as :func:`transcode_video`, the same for every job.
        workers: processes (default :func:`default_workers`); 1 runs in this process.
        progress: show the progress bar (``desc``: its label, ``unit``: what one job is).
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    for j in jobs:
        if not isinstance(j, TranscodeJob):
            raise TypeError(f"jobs must be TranscodeJob items, got {type(j).__name__}")
    dsts = [os.path.abspath(j.dst) for j in jobs]
    if len(set(dsts)) != len(dsts):
        dup = sorted({d for d in dsts if dsts.count(d) > 1})
        raise ValueError(f"several jobs write the same output: {dup[:5]}")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    options = {"fps": fps, "short_side": short_side, "max_seconds": max_seconds}
    _check_positive("fps", fps, allow_none=False)
    _check_positive("max_seconds", max_seconds)
    if short_side is not None:
        output_size(2, 2, short_side)

    result = TranscodeResult()
    todo = []
    folders = set()
    for j in jobs:
        if os.path.isfile(j.dst):
            result.existing.append(j.dst)
        else:
            folders.add(os.path.dirname(os.path.abspath(j.dst)))
            todo.append(j)
    for folder in sorted(folders):
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)

    def record(job: TranscodeJob, reason: Optional[str]) -> None:
        if reason is None:
            result.done.append(job.dst)
        else:
            result.failed[job.src] = reason
            result.failed_outputs[job.dst] = reason

    bar = tqdm(total=len(todo), desc=desc, unit=unit, disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for j in todo:
                record(*_run_job(j, options))
                bar.update(1)
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            # fork where there is one: workers start at once, without importing torch again
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(_run_job, j, options): j for j in todo}
                for fut in cf.as_completed(futures):
                    try:
                        record(*fut.result())
                    except Exception as e:  # noqa: BLE001 (a worker that died: its job failed, not the run)
                        record(futures[fut], f"worker failed ({type(e).__name__}: {e})")
                    bar.update(1)
    finally:
        bar.close()
    return result
