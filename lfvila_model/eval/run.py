"""Evaluation on real data (spec 4.2).

- Retrieval: encode every validation video and paragraph, rank from the full similarity matrix, write
  `metrics.json` and the PNG figure beside it.
- QA and classification (How2QA, VIOLIN, ActivityNet-QA, COIN/LVU): top-1 accuracy of the model's logits over
  the readable validation items, written as JSON (`{"accuracy": %, "num_examples": n, "skipped_videos": [...]}`).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..data.datasets import collate

__all__ = ["encode_retrieval", "evaluate_retrieval", "accuracy", "predict_logits", "evaluate_accuracy"]


def _readable_batches(model, dataset, batch_size: int, num_workers: int, progress: bool, desc: str, skipped: list):
    """Collated batches of `dataset` with at least one readable item, the model in eval mode meanwhile (restored
    after); unreadable videos' paths are appended to `skipped`."""
    from tqdm.auto import tqdm

    from ..data.loader import make_loader

    loader = make_loader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                         device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        for b in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            skipped += [s["path"] for s in b["skipped"]]
            if b["size"]:
                yield b
    finally:
        model.train(was)


@torch.no_grad()
def encode_retrieval(model, dataset, batch_size: int = 16, num_workers: int = 0, device=None, progress: bool = False):
    """L2-normalised `(video (N, E), paragraph (N, E))` features of the readable items, and the skipped paths.
    Works for `LFVILAPretrain` (stage 1 global features) and `LFVILARetrieval`."""
    from ..models import LFVILAPretrain, LFVILARetrieval

    device = device or next(model.parameters()).device
    vs, ps, skipped = [], [], []
    for b in _readable_batches(model, dataset, batch_size, num_workers, progress, "encoding", skipped):
        video = b["video"].to(device)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        if isinstance(model, LFVILAPretrain):
            f = model.stage1_features(video, ids, mask)
            vs.append(f["video"].float().cpu())
            ps.append(f["paragraph"].float().cpu())
        elif isinstance(model, LFVILARetrieval):
            vs.append(model.encode_video(video).float().cpu())
            ps.append(model.encode_text(ids, mask).float().cpu())
        else:
            raise TypeError(f"retrieval evaluation needs an LFVILAPretrain or LFVILARetrieval, got {type(model).__name__}")
    if not vs:
        raise RuntimeError("no readable validation video")
    return torch.cat(vs), torch.cat(ps), skipped


def evaluate_retrieval(model, dataset, batch_size: int = 16, out_path: Optional[str] = None, figure: bool = True,
                       num_workers: int = 0, progress: bool = False) -> dict:
    """Text-to-video and video-to-text R@1/5/10/50, MedR, MeanR (`lfvila_model.eval.retrieval`)."""
    from .retrieval import retrieval_metrics, write_metrics_json

    t0 = time.perf_counter()
    v, p, skipped = encode_retrieval(model, dataset, batch_size, num_workers, progress=progress)
    metrics = retrieval_metrics(p @ v.T, return_ranks=True)
    metrics["skipped_videos"] = skipped
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if out_path:
        write_metrics_json(out_path, metrics, figure=figure)
    return metrics


def accuracy(logits, labels) -> dict:
    """Top-1 accuracy.

    Args:
        logits: float `(N, C)` (C classes, or the K candidates of multiple choice).
        labels: int `(N,)` in [0, C).
    Returns:
        `{"accuracy": percent correct, "num_correct": int, "num_examples": N}`. The prediction is the first
        index of the row maximum (`argmax`), so a tie goes to the lower class. N = 0 gives accuracy 0.

    Example: logits `[[0, 2], [3, 1], [1, 1]]`, labels `[1, 1, 0]` -> predictions 1, 0, 0 -> 2 of 3 = 66.67 %.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(logits.shape[:1])} to match logits, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    n = int(labels.numel())
    if n and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must be in [0, {logits.shape[1]}), got min {int(labels.min())}, "
                         f"max {int(labels.max())}")
    correct = int((logits.argmax(dim=1) == labels).sum()) if n else 0
    return {"accuracy": 100.0 * correct / n if n else 0.0, "num_correct": correct, "num_examples": n}


@torch.no_grad()
def predict_logits(model, dataset, batch_size: int = 16, num_workers: int = 0, device=None, progress: bool = False):
    """Logits of every readable item: `(logits (N, C), labels (N,), skipped paths)`.

    The model is an `LFVILAQAMultichoice` (batches with `input_ids (B, K, M, L)`: logits over the K candidates),
    an `LFVILAQAClassification` (`input_ids (B, M, L)`) or an `LFVILAVideoClassification` (video only).
    """
    from ..models import LFVILAQAClassification, LFVILAQAMultichoice, LFVILAVideoClassification

    if not isinstance(model, (LFVILAQAMultichoice, LFVILAQAClassification, LFVILAVideoClassification)):
        raise TypeError(f"accuracy evaluation needs an LFVILAQAMultichoice, LFVILAQAClassification or "
                        f"LFVILAVideoClassification model, got {type(model).__name__}")
    device = device or next(model.parameters()).device
    logits, labels, skipped = [], [], []
    for b in _readable_batches(model, dataset, batch_size, num_workers, progress, "evaluating", skipped):
        if "labels" not in b:
            raise ValueError("accuracy evaluation needs labelled items (a dataset of lfvila_model.data.qa)")
        video = b["video"].to(device)
        if isinstance(model, LFVILAVideoClassification):
            out = model(video)
        else:
            if "input_ids" not in b:
                raise ValueError(f"{type(model).__name__} needs token ids: build the dataset with a tokenizer")
            out = model(video, b["input_ids"].to(device), b["attention_mask"].to(device))
        logits.append(out["logits"].float().cpu())
        labels.append(b["labels"])
    if not logits:
        raise RuntimeError("no readable validation video")
    return torch.cat(logits), torch.cat(labels), skipped


def evaluate_accuracy(model, dataset, batch_size: int = 16, out_path: Optional[str] = None, num_workers: int = 0,
                      progress: bool = False) -> dict:
    """Top-1 accuracy (%) of a QA / classification model on `dataset` (spec 4.2: every QA and classification
    trainer reports accuracy). Unreadable videos are left out of `num_examples` and listed in `skipped_videos`.
    Writes the metrics as JSON to `out_path` when given."""
    from .retrieval import write_metrics_json

    t0 = time.perf_counter()
    logits, labels, skipped = predict_logits(model, dataset, batch_size, num_workers, progress=progress)
    metrics = accuracy(logits, labels)
    metrics["skipped_videos"] = skipped
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if out_path:
        write_metrics_json(out_path, metrics, figure=False)
    return metrics
