"""The LF-VILA training losses, as thin calls of the fused ops in `lfvila_kernels` (spec 3, 4.2).

The contrastive ops are imported inside the functions: the model itself (features, heads) needs only the HTWA op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["vpc_loss", "mtc_loss", "vtm_shuffle", "mlm_loss", "span_loss"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def vpc_loss(video: Tensor, paragraph: Tensor, temperature: float) -> Tensor:
    """Video-paragraph contrastive loss (spec 3.1): CE over rows + CE over columns of v p^T / tau, summed, on the
    global batch (all-gathered with gradient when distributed).

    Args:
        video, paragraph: `(B, C)` L2-normalised features, row i of each a positive pair.
    Returns:
        scalar.
    """
    from lfvila_kernels import gather_with_grad, info_nce_loss

    if _distributed():
        video, paragraph = gather_with_grad(video), gather_with_grad(paragraph)
    return info_nce_loss(video, paragraph, temperature, symmetric=True)


def mtc_loss(
    clips: Tensor,
    sentences: Tensor,
    temperature: float,
    *,
    num_key: int = 2,
    num_value: int = 2,
    rolls: Sequence[int] = (0, 1, 2),
    indices: Optional[tuple] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Multimodal temporal contrastive loss (spec 3.2), both directions summed, on the global batch.

    Args:
        clips, sentences: `(B, M, C)` L2-normalised clip / sentence features (clip m <-> sentence m).
        indices: `(key_idx, value_idx, other_idx)` as drawn by `lfvila_kernels.sample_mtc_indices` for the
            global batch; drawn here (with `generator`) when None.
    Returns:
        scalar.
    """
    from lfvila_kernels import gather_with_grad, sample_mtc_indices, temporal_contrastive_loss

    if _distributed():
        clips, sentences = gather_with_grad(clips), gather_with_grad(sentences)
    if indices is None:
        indices = sample_mtc_indices(clips.shape[0], clips.shape[1], num_key, num_value, generator=generator)
    key_idx, value_idx, other_idx = (t.to(clips.device) for t in indices)
    return temporal_contrastive_loss(clips, sentences, key_idx, value_idx, other_idx, temperature, rolls=tuple(rolls))


def vtm_shuffle(video_tokens: Tensor):
    """Negative pairs for video-text matching (spec 3.3), within the local batch: the first floor(B/2) samples get
    the video of the previous sample in that half (roll by 1), label 0; the rest keep theirs, label 1.

    Args:
        video_tokens: `(B, N, D)`.
    Returns:
        (shuffled `(B, N, D)`, labels `(B,)` int64).
    """
    B = video_tokens.shape[0]
    h = B // 2
    shuffled = torch.cat([video_tokens[:h].roll(1, dims=0), video_tokens[h:]], dim=0)
    labels = torch.cat([video_tokens.new_zeros(h, dtype=torch.long), video_tokens.new_ones(B - h, dtype=torch.long)])
    return shuffled, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked-LM cross entropy over positions with label != -100.

    Args:
        logits: `(N, V)`; labels `(N,)` int64 with -100 for ignored positions.
    Returns:
        scalar (0 with a zero gradient path when nothing is masked).
    """
    if (labels != -100).any():
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
    return logits.sum() * 0.0


def span_loss(logits: Tensor, span_labels: Tensor) -> Tensor:
    """How2QA span loss: per-frame in/out-of-span 2-way CE with class-balanced weights (each class weighted by
    N / (2 N_c) over the frames of the batch, so both classes count equally).

    Args:
        logits: `(B, T, 2)` (already max-reduced over candidates); span_labels `(B, T)` in {0, 1} (-100 ignored).
    Returns:
        scalar.
    """
    labels = span_labels.reshape(-1)
    valid = labels != -100
    counts = torch.stack([(labels[valid] == c).sum() for c in (0, 1)]).to(logits.dtype).clamp(min=1.0)
    weight = valid.sum().to(logits.dtype) / (2.0 * counts)
    return F.cross_entropy(logits.reshape(-1, 2).float(), labels, weight=weight.float(), ignore_index=-100)
