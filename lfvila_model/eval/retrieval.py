"""Retrieval metrics from a full similarity matrix (spec 4.2) and the demo's temporal-order score.

``sim[i, j]`` is the similarity of text i and video j; text i and video i are the ground-truth pair.

Ranks are 1-based. **Ties count against the query** (pessimistic): the rank of the true item is 1 + the
number of *other* candidates whose score is greater than *or equal to* its own. This does not depend on the order
of the candidates, and a model that scores everything alike gets the worst rank, never a lucky first place.
(The official code sorts and takes the position of the true item, which breaks ties by sort order.)

Recall R@K is a percentage (the fraction of queries whose true item ranks <= K, times 100); median and mean
rank are over all queries.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from ..jsonable import jsonable

__all__ = ["ranks_from_similarity", "retrieval_metrics", "recall_at", "temporal_order_score",
           "write_metrics_json", "DEFAULT_KS"]

DEFAULT_KS = (1, 5, 10, 50)


def _as_matrix(sim: Any, name: str = "sim") -> np.ndarray:
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().to("cpu", torch.float64).numpy()
    if not isinstance(sim, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(sim).__name__}")
    if sim.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {sim.shape}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {sim.shape}")
    if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued, got dtype {sim.dtype}")
    sim = sim.astype(np.float64, copy=False)
    if not np.isfinite(sim).all():
        bad = np.argwhere(~np.isfinite(sim))[0]
        raise ValueError(f"{name} must be finite; entry {tuple(int(b) for b in bad)} is {sim[tuple(bad)]}")
    return sim


def ranks_from_similarity(sim: Any, targets: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each row's target column (ties pessimistic, see the module docstring).

    Args:
        sim: ``(Q, C)`` scores of Q queries against C candidates.
        targets: ``(Q,)`` target column per row; default ``arange(Q)`` (square matrix, diagonal pairs).
    Returns: int64 ``(Q,)`` ranks in [1, C].
    """
    s = _as_matrix(sim)
    q, c = s.shape
    if targets is None:
        if q != c:
            raise ValueError(f"sim must be square when targets is None (pair i <-> i), got shape {s.shape}")
        t = np.arange(q)
    else:
        t = np.asarray(targets)
        if t.shape != (q,) or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"targets must be {q} integers, got shape {t.shape} dtype {t.dtype}")
        if t.min() < 0 or t.max() >= c:
            raise ValueError(f"targets must be in [0, {c}), got range [{t.min()}, {t.max()}]")
    true = s[np.arange(q), t][:, None]
    # >= counts the target itself once; that one is the "1 +" of a 1-based rank
    return (s >= true).sum(axis=1).astype(np.int64)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of ranks <= k."""
    return float(100.0 * np.mean(np.asarray(ranks) <= k))


def _summary(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"R@{k}": recall_at(ranks, k) for k in ks}
    out["MedR"] = float(np.median(ranks))
    out["MeanR"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sim: Any, ks: Sequence[int] = DEFAULT_KS, return_ranks: bool = False) -> dict[str, Any]:
    """Text-to-video and video-to-text metrics from the full ``(N, N)`` text-by-video similarity matrix.

    Returns ``{"t2v": {"R@1", "R@5", "R@10", "R@50", "MedR", "MeanR"}, "v2t": {...}, "num_queries": N}``
    (plus ``"ranks": {"t2v": [...], "v2t": [...]}`` when ``return_ranks``).
    """
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    s = _as_matrix(sim)
    if s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be square (text i <-> video i), got shape {s.shape}")
    r_t2v = ranks_from_similarity(s)
    r_v2t = ranks_from_similarity(s.T)
    out: dict[str, Any] = {"t2v": _summary(r_t2v, ks), "v2t": _summary(r_v2t, ks), "num_queries": int(s.shape[0])}
    if return_ranks:
        out["ranks"] = {"t2v": r_t2v.tolist(), "v2t": r_v2t.tolist()}
    return out


def temporal_order_score(scores: Any, true_index: Sequence[int] | np.ndarray | int = 0) -> float:
    """Fraction of videos whose true paragraph scores *strictly* above every other order of its sentences.

    Args:
        scores: ``(N, K)``: video n against its K candidate paragraphs (``temporal_order_candidates``), or a
            list of N 1-D score sequences (K may then differ per video).
        true_index: the true candidate's column, per video or one for all (0 for ``temporal_order_candidates``).
    Returns: a fraction in [0, 1]. A tie with another order is a failure (an order-blind model scores 0).
    """
    if isinstance(scores, (list, tuple)):
        rows = [_as_matrix(np.asarray(r, dtype=np.float64)[None], f"scores[{i}]")[0] for i, r in enumerate(scores)]
    else:
        rows = list(_as_matrix(scores, "scores"))
    n = len(rows)
    if n == 0:
        raise ValueError("scores must contain at least one video")
    t = np.full(n, true_index) if np.isscalar(true_index) else np.asarray(true_index)
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"true_index must be an int or {n} ints, got {true_index!r:.80}")
    wins = 0
    for i, (row, ti) in enumerate(zip(rows, t)):
        if not 0 <= ti < len(row):
            raise ValueError(f"true_index[{i}] = {ti} out of range for {len(row)} candidates")
        if len(row) < 2:
            raise ValueError(f"video {i} has {len(row)} candidate(s); an order score needs at least 2")
        wins += int(ranks_from_similarity(row[None], [int(ti)])[0] == 1)
    return wins / n


def write_metrics_json(path: str | os.PathLike, metrics: dict[str, Any], figure: bool = True,
                       sim: Any = None) -> dict[str, str]:
    """Writes ``metrics`` as JSON (atomically) and, if ``figure`` and the ranks are known, a PNG beside it
    (same name, ``.png``): rank histograms and recall-at-K curves for both directions.

    The ranks come from ``metrics["ranks"]`` or, if absent, are computed from ``sim``.
    Returns the written paths (``{"json": ..., "png": ...}``).
    """
    path = os.fspath(path)
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    ranks = metrics.get("ranks")
    if ranks is None and sim is not None:
        ranks = retrieval_metrics(sim, return_ranks=True)["ranks"]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(jsonable(metrics), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    out = {"json": path}
    if figure and ranks is not None:
        from .figure import retrieval_figure

        png = os.path.splitext(path)[0] + ".png"
        retrieval_figure(png, {k: np.asarray(v) for k, v in ranks.items()})
        out["png"] = png
    return out
