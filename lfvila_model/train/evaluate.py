"""Retrieval evaluation on real data (spec 4.2): encode every validation video and paragraph, rank from the full
similarity matrix, write `metrics.json` and the PNG figure beside it."""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..data.datasets import collate

__all__ = ["encode_retrieval", "evaluate_retrieval"]


@torch.no_grad()
def encode_retrieval(model, dataset, batch_size: int = 16, num_workers: int = 0, device=None, progress: bool = False):
    """L2-normalised `(video (N, E), paragraph (N, E))` features of the readable items, and the skipped paths.
    Works for `LFVILAPretrain` (stage 1 global features) and `LFVILARetrieval`."""
    from tqdm.auto import tqdm

    from ..models import LFVILAPretrain, LFVILARetrieval

    device = device or next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    vs, ps, skipped = [], [], []
    was = model.training
    model.eval()
    for b in tqdm(loader, desc="encoding", unit="batch", disable=not progress):
        skipped += [s["path"] for s in b["skipped"]]
        if b["size"] == 0:
            continue
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
    model.train(was)
    if not vs:
        raise RuntimeError("no readable validation video")
    return torch.cat(vs), torch.cat(ps), skipped


def evaluate_retrieval(model, dataset, batch_size: int = 16, out_path: Optional[str] = None, figure: bool = True,
                       num_workers: int = 0, progress: bool = False) -> dict:
    """Text-to-video and video-to-text R@1/5/10/50, MedR, MeanR (`lfvila_model.eval.retrieval`)."""
    from ..eval.retrieval import retrieval_metrics, write_metrics_json

    t0 = time.perf_counter()
    v, p, skipped = encode_retrieval(model, dataset, batch_size, num_workers, progress=progress)
    metrics = retrieval_metrics(p @ v.T, return_ranks=True)
    metrics["skipped_videos"] = skipped
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if out_path:
        write_metrics_json(out_path, metrics, figure=figure)
    return metrics
