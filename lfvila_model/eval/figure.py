"""The retrieval figure: recall at K for text-to-video and video-to-text, drawn with matplotlib.

One panel: recall at K (percent) against K on a log axis (K = 1, 5, 10, 50, 100, ... up to N), one line per
direction and run, markers at every K with the R@1, R@5 and R@10 values written beside them, and each line's
median rank in the legend. The figure is built on a :class:`matplotlib.figure.Figure` with its own Agg canvas,
so the caller's pyplot state and chosen backend are never touched.

matplotlib is in the ``model`` extra; without it :func:`retrieval_figure` raises an ImportError that says so
(``write_metrics_json`` writes the JSON before it imports this module, so the metrics are never lost).
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter, NullLocator
except ImportError as e:  # pragma: no cover - exercised only where matplotlib is absent
    raise ImportError("lfvila's retrieval figure needs matplotlib, which is in the 'model' extra: "
                      "pip install 'lfvila[model]' (or pip install matplotlib)") from e

__all__ = ["retrieval_figure", "recall_at_k", "k_values", "ANNOTATED_K"]

Ranks = Mapping[str, np.ndarray]
ANNOTATED_K = (1, 5, 10)
_DIRECTION_LABEL = {"t2v": "text → video", "v2t": "video → text"}
# colour per run (tab10), line style / marker per direction
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_STYLES = {"t2v": ("-", "o"), "v2t": ("--", "s")}
_OTHER_STYLES = (("-.", "^"), (":", "D"))


def k_values(n: int) -> np.ndarray:
    """K = 1, 5, 10, 50, 100, 500, ... below ``n``, then ``n`` itself (where recall is 100 %)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, decade = [], 1
    while decade < n:
        ks += [k for k in (decade, 5 * decade) if k < n]
        decade *= 10
    return np.array(ks + [n], dtype=np.int64)


def recall_at_k(ranks: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Percent of queries whose true item has rank <= K (ranks are 1-based), for each K in ``ks``."""
    ranks = np.asarray(ranks)
    return np.array([100.0 * np.mean(ranks <= k) for k in ks])


def _runs(ranks: Union[Ranks, Mapping[str, Ranks]], run: str | None) -> dict[str, dict[str, np.ndarray]]:
    """``{direction: ranks}`` (one run) or ``{run: {direction: ranks}}`` (several) -> ``{run: {direction: ranks}}``."""
    if not ranks:
        raise ValueError("ranks must hold at least one direction")
    nested = all(isinstance(v, Mapping) for v in ranks.values())
    runs = {str(k): dict(v) for k, v in ranks.items()} if nested else {run or "": dict(ranks)}
    out = {}
    for name, dirs in runs.items():
        if not dirs:
            raise ValueError(f"run {name!r} holds no direction")
        out[name] = {}
        for d, r in dirs.items():
            r = np.asarray(r)
            if r.ndim != 1 or r.size == 0 or not np.issubdtype(r.dtype, np.integer) or r.min() < 1:
                raise ValueError(f"ranks[{name!r}][{d!r}] must be a non-empty 1-D array of ranks >= 1, "
                                 f"got {r.dtype} {r.shape}")
            out[name][d] = r.astype(np.int64)
    return out


def _num_items(ranks: np.ndarray) -> int:
    """N of a direction: its number of queries (or more, if a rank is larger: fewer queries than candidates)."""
    return max(int(ranks.max()), ranks.size)


def _run_from_path(path: str) -> str:
    """runs/demo/eval/metrics.png -> "demo": the folder holding the eval output (or its parent, if "eval")."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "eval":
        folder = os.path.dirname(folder)
    return os.path.basename(folder)


def retrieval_figure(path: str | os.PathLike | None, ranks: Union[Ranks, Mapping[str, Ranks]],
                     width: int = 960, height: int = 640, *, run: str | None = None, dpi: int = 160) -> Figure:
    """Draws recall at K for each direction in ``ranks`` and writes it as a PNG of ``width`` x ``height`` pixels.

    ``ranks`` is ``{"t2v": (N,), "v2t": (N,)}`` of 1-based ranks for one run, or ``{run: {...}}`` for several
    runs on one figure. ``run`` names a single run in the title (default: the run folder ``path`` lies in).
    ``path=None`` draws without writing. Returns the :class:`~matplotlib.figure.Figure` (one axes; its lines are
    the recall curves at every K = 1..N of their run, in the order of ``ranks``; each line's ``get_gid()`` is
    ``"<direction>"``, or ``"<run>/<direction>"`` with several runs).
    """
    path = None if path is None else os.fspath(path)
    if run is None and path is not None:
        run = _run_from_path(path)
    runs = _runs(ranks, run)
    several = len(runs) > 1
    n = max(_num_items(r) for dirs in runs.values() for r in dirs.values())
    ks = k_values(n)

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, dirs) in enumerate(runs.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        for j, (d, r) in enumerate(dirs.items()):
            style, marker = _STYLES.get(d, _OTHER_STYLES[j % len(_OTHER_STYLES)])
            if not several:  # one run: the directions get the colours
                colour = _COLOURS[j % len(_COLOURS)]
            n_d = _num_items(r)
            # the curve at every K = 1..N (a step at each rank), the markers at the K of the axis ticks
            k_all = np.arange(1, n_d + 1)
            rec_all = recall_at_k(r, k_all)
            ks_d = k_values(n_d)
            what = f"{d}: {_DIRECTION_LABEL[d]}" if d in _DIRECTION_LABEL else d
            label = f"{what} (median rank {np.median(r):g})"
            if several:  # no room for the values on the plot: R@1/5/10 go into the legend
                at = "/".join(f"{rec_all[min(k, n_d) - 1]:.1f}" for k in ANNOTATED_K)
                label = f"{name}, {what}: R@1/5/10 {at}, median rank {np.median(r):g}"
            # recall at K is a step function of K: drawn as steps, not interpolated between ranks
            ax.plot(k_all, rec_all, linestyle=style, marker=marker, markevery=list(ks_d - 1), markersize=5,
                    linewidth=1.8, drawstyle="steps-post", color=colour, label=label,
                    gid=f"{name}/{d}" if several else d)
            if several:
                continue
            for k, v in zip(ks_d, rec_all[ks_d - 1]):
                if k in ANNOTATED_K:
                    # t2v values above the point, v2t below, so the two directions' labels do not overlap
                    up = j % 2 == 0
                    ax.annotate(f"{v:.1f}", (k, v), xytext=(0, 7 if up else -7), textcoords="offset points",
                                ha="center", va="bottom" if up else "top", fontsize=7, color=colour)

    ax.set_xscale("log")
    ax.set_xlim(0.8, n * 1.25)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    # N gets its tick but no label when it is too close to the previous one (50 and 60 would overprint)
    labels = [str(int(k)) if i == 0 or i < len(ks) - 1 or k / ks[i - 1] >= 1.6 else "" for i, k in enumerate(ks)]
    ax.xaxis.set_major_formatter(FixedFormatter(labels))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-3, 106)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("K (rank cut-off)")
    ax.set_ylabel("Recall@K (%)")
    ax.grid(True, which="major", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title = "Retrieval recall at K"
    if several:
        title += f": {', '.join(runs)}"
    elif run:
        title += f": {run}"
    ax.set_title(f"{title} (N = {n})", fontsize=11)
    if several:
        fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    else:
        ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)

    if path is not None:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.png"  # atomically: a reader never sees half a PNG
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    return fig

