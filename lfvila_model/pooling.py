"""Post-encoder video pooling shared by every LF-VILA head (spec 1.2, `downsample_video_embd`).

The final `(B, T, 3, 5, C)` grid is max-pooled per frame with a (2, 3) kernel, stride 1, giving 2 x 3 = 6 tokens
per frame; clip features are means over the frames of a clip and their tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["pool_frame_tokens", "clip_means"]


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
