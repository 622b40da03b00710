"""Post-encoder video pooling shared by every LF-VILA head (spec 1.2, `downsample_video_embd`).

The final `(B, T, 3, 5, C)` grid is max-pooled per frame with a (2, 3) kernel, stride 1, giving 2 x 3 = 6 tokens
per frame; clip features are means over the frames of a clip and their tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pool_frame_tokens", "clip_means", "global_video_features", "global_paragraph_features"]


def pool_frame_tokens(x: Tensor, kernel=(2, 3)) -> Tensor:
    """Per-frame MaxPool2d, stride 1.

    Args:
        x: `(B, T, H, W, C)` encoder output.
        kernel: `(kh, kw)`, each <= the grid.
    Returns:
        `(B, T, P, C)` with P = (H - kh + 1) * (W - kw + 1) tokens per frame, row-major (6 for 3x5 and (2, 3)).
    """
    B, T, H, W, C = x.shape
    y = F.max_pool2d(x.reshape(B * T, H, W, C).permute(0, 3, 1, 2), kernel_size=tuple(kernel), stride=1)
    return y.flatten(2).transpose(1, 2).reshape(B, T, -1, C)


def clip_means(tokens: Tensor, num_clips: int) -> Tensor:
    """Mean over each clip's frames and tokens.

    Args:
        tokens: `(B, T, P, C)` pooled tokens, T divisible by `num_clips` (frames of clip m are [m*T/M, (m+1)*T/M)).
    Returns:
        `(B, num_clips, C)`.
    """
    B, T, P, C = tokens.shape
    if T % num_clips:
        raise ValueError(f"frames T={T} must divide by num_clips={num_clips}")
    return tokens.reshape(B, num_clips, T // num_clips * P, C).mean(dim=2)


# --------------------------------------------------------------------------------------------------------------
# VPC (global) features.
#
# "official" (spec 3): v = normalise(W_vg mean_m clip_m), p = normalise(W_tg paragraph token). Both are sums over
# positions, so the order of the clips and sentences reaches them only through what the encoders mix into each
# token (no absolute temporal position exists in the stage-1 video encoder).
# "ordered": v = concat_m normalise(W_vg clip_m) / sqrt(M) and p = concat_m normalise(W_tg h_m) / sqrt(M), h_m the
# paragraph encoder's output at sentence m's first token. Then v . p = mean_m cos(clip_m, sentence m in context):
# clip m is compared with sentence m, so a paragraph with the same sentences in another order scores lower. Same
# weights as "official" (checkpoints are interchangeable); the features are M x proj_dim wide.


def global_video_features(clips: Tensor, proj: nn.Module, mode: str = "official") -> Tensor:
    """`(B, M, C)` clip means -> L2-normalised `(B, E)` ("official") or `(B, M * E)` ("ordered")."""
    if mode == "official":
        return F.normalize(proj(clips.mean(dim=1)), dim=-1)
    if mode == "ordered":
        return F.normalize(proj(clips), dim=-1).flatten(1) / math.sqrt(clips.shape[1])
    raise ValueError(f"global_features must be 'official' or 'ordered', got {mode!r}")


def global_paragraph_features(para: Tensor, proj: nn.Module, mode: str = "official", num_sentences: int = 1,
                              sentence_len: int = 1) -> Tensor:
    """Paragraph-encoder output `(B, 1 + M * L, D)` -> L2-normalised `(B, E)` ("official": the paragraph token) or
    `(B, M * E)` ("ordered": the M sentences' first tokens, positions 1 + m * L)."""
    if mode == "official":
        return F.normalize(proj(para[:, 0]), dim=-1)
    if mode == "ordered":
        if para.shape[1] != 1 + num_sentences * sentence_len:
            raise ValueError(f"para must hold 1 + M*L = {1 + num_sentences * sentence_len} tokens "
                             f"(M={num_sentences}, L={sentence_len}), got {para.shape[1]}")
        pos = 1 + torch.arange(num_sentences, device=para.device) * sentence_len
        return F.normalize(proj(para[:, pos]), dim=-1).flatten(1) / math.sqrt(num_sentences)
    raise ValueError(f"global_features must be 'official' or 'ordered', got {mode!r}")
