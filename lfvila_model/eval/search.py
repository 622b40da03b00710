"""Paragraph-to-video search over an index written by `lfvila embed` (`lfvila search`, the search page).

The score of a video is ``encode_paragraphs([query]) @ features.T``: the cosine similarity the retrieval
evaluation ranks by (both sides are L2-normalised). Results are ``[{"id", "score"}, ...]``, best first; equal
scores keep the index's row order.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Optional, Sequence

import torch

from .embed import Index, load_model, read_index

__all__ = ["rank", "results_json", "Searcher"]


def rank(query: torch.Tensor, features: torch.Tensor, ids: Sequence[str], top_k: Optional[int] = 10) -> list[dict]:
    """Ranks the rows of ``features`` ``(N, E)`` by their dot product with ``query`` ``(E,)``.

    Returns the ``top_k`` best (all N when None) as ``[{"id": ids[row], "score": float}, ...]``, best first; ties
    keep row order (stable sort).
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if query.ndim != 1 or features.ndim != 2 or features.shape[1] != query.shape[0]:
        raise ValueError(f"query (E,) and features (N, E) must agree, got {tuple(query.shape)} and "
                         f"{tuple(features.shape)}")
    scores = features.float() @ query.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    if top_k is not None:
        order = order[:top_k]
    return [{"id": ids[i], "score": float(scores[i])} for i in order.tolist()]


def results_json(results: list[dict]) -> str:
    """The JSON text of a ranking, as `lfvila search --json` prints it and `GET /api/search` returns it."""
    return json.dumps(results, indent=2)


class Searcher:
    """An index and the model it names, loaded once; :meth:`search` ranks the indexed videos for a paragraph.

    Args:
        index: an index prefix (``PREFIX.json`` + ``PREFIX.safetensors``) or an :class:`Index`.
        model: the model to encode queries with (default: the index's checkpoint or preset, loaded here).
        device: where a loaded model runs (text encoding is cheap: the CPU by default).
    Thread-safe: queries from several threads (the search page's server) run one at a time.
    """

    def __init__(self, index: str | os.PathLike | Index, model=None, device: str | torch.device = "cpu"):
        self.index = index if isinstance(index, Index) else read_index(index)
        meta = self.index.meta
        if model is None:
            if meta.get("checkpoint") is None and meta.get("preset") is None:
                raise ValueError("the index names neither a checkpoint nor a preset; pass model=")
            model = load_model(meta.get("checkpoint"), meta.get("preset"), device)
        if model.embedding_dim != self.index.features.shape[1]:
            raise ValueError(f"the model's features are {model.embedding_dim} wide, the index's "
                             f"{self.index.features.shape[1]}: not the model the index was built with")
        self.model = model
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index.ids)

    def search(self, paragraph, top_k: Optional[int] = 10) -> list[dict]:
        """``paragraph``: a string (split into sentences) or a list of sentences. Returns ``[{"id", "score"}]``,
        best first, ``top_k`` of them (all when None)."""
        with self._lock:
            q = self.model.encode_paragraphs([paragraph])[0]
        return rank(q, self.index.features, self.index.ids, top_k)
