"""LF-VILA's video encoder: a 3D Swin transformer with hierarchical temporal window attention (HTWA).

Paper: Sun et al., "Long-Form Video-Language Pre-Training with Multimodal Temporal Contrastive Learning",
NeurIPS 2022 (arXiv 2210.06031). Behaviour: spec sections 1.1-1.5. Weights: official `lfvila_stage1.bin`, or a
Swin-B IN-22k checkpoint inflated to 3D (`weight_maps.swin_2d_to_3d`).

Tokens stay channels-last on their (frame, row, column) grid, `(B, T, H, W, C)`, from the patch embedding to
the output. Window partitioning, the cyclic shift and its region mask, and the relative position bias are all
inside `lfvila_kernels.htwa_attention`: the model neither rolls nor partitions.

State-dict names equal the official ones (spec 6), e.g. `layers.2.blocks.13.attn.relative_position_bias_table`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lfvila_kernels import htwa_attention_qkv
from lfvila_kernels.reference import relative_position_index
from lfvila_kernels.shapes import effective_window_and_shift  # the official get_window_size (spec 1.3)

from .config import VideoEncoderConfig
from .fused_block import norm_linear, norm_mlp

__all__ = ["VideoEncoder"]


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def _scale(self, x: Tensor) -> Optional[Tensor]:
        """Per-sample multiplier mask / keep, shape `(B, 1, ...)`; None when inactive."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x)
        return x if scale is None else x * scale

    def residual(self, shortcut: Tensor, x: Tensor) -> Tensor:
        """`shortcut + self(x)` in one op (addcmul): no token-sized temporaries for the scaled branch."""
        scale = self._scale(x)
        return shortcut + x if scale is None else torch.addcmul(shortcut, x, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed3D(nn.Module):
    """Conv3d patch projection + LayerNorm.

    Args:
        x: `(B, 3, T, H, W)` pixels, T, H, W multiples of the patch (checked by the encoder).
    Returns:
        `(B, T/pt, H/ph, W/pw, C)`.
    """

    def __init__(self, patch_size, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # B, T, H, W, C
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """Spatial 2x2 merge per frame: concat the neighbours (h, w) = (0,0), (1,0), (0,1), (1,1) -> LayerNorm(4C) ->
    Linear(4C -> 2C, no bias). An odd H or W is zero-padded by one row/column first (spec 1.1).

    Args:
        x: `(B, T, H, W, C)`.
    Returns:
        `(B, T, ceil(H/2), ceil(W/2), 2C)`.
    """

    def __init__(self, dim: int, fused: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.fused = fused  # norm + reduction through fused_block.norm_linear (the normalised 4C not kept)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[2:4]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
        if self.fused and torch.is_grad_enabled():
            return norm_linear(x, self.norm, self.reduction)
        return self.reduction(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows with a learned relative position bias, through the HTWA op.

    The bias table is built for the *configured* window; when the grid clips the window, `bias_window` makes the
    op index it the official way (spec 1.3 quirk). `relative_position_index` is kept as a persistent buffer only
    for state-dict compatibility with the official checkpoints; it is recomputed from the window, never read.

    Args:
        x: `(B, T, H, W, C)` normalised tokens; the grid must be >= `window` per axis.
        window, shift: effective window and shift of this call.
    Returns:
        `(B, T, H, W, C)`.
    """

    def __init__(self, dim: int, window, num_heads: int, qkv_bias: bool, proj_drop: float, backend: str):
        super().__init__()
        self.dim = dim
        self.window = tuple(window)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        wt, wh, ww = self.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, window, shift) -> Tensor:
        return self.attend(self.qkv(x), window, shift)

    def attend(self, qkv: Tensor, window, shift) -> Tensor:
        """The attention and output projection from the qkv projection's output `(B, T, H, W, 3C)`."""
        B, T, H, W, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.view(B, T, H, W, 3, self.num_heads, self.head_dim)  # q, k, v read through strides
        out = htwa_attention_qkv(
            qkv, self.relative_position_bias_table, window=window, shift=shift, bias_window=self.window,
            scale=self.scale, backend=self.backend,
        )
        return self.proj_drop(self.proj(out.view(B, T, H, W, C)))


class SwinBlock3D(nn.Module):
    """Pre-norm block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))). Odd blocks of a layer use the
    shifted windows.

    Args:
        x: `(B, T, H, W, C)`.
    Returns:
        `(B, T, H, W, C)`.
    """

    def __init__(self, dim, num_heads, window, shifted: bool, mlp_ratio, qkv_bias, drop, drop_path, backend,
                 ragged_windows: str, fused: bool = True):
        super().__init__()
        self.window = tuple(window)
        self.shifted = shifted
        self.ragged_windows = ragged_windows
        self.fused = fused
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, num_heads, qkv_bias, drop, backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention(self, x: Tensor, fused: bool) -> Tensor:
        T, H, W = x.shape[1:4]
        window, shift = effective_window_and_shift((T, H, W), self.window, self.shifted)
        pads = [(-n) % w for n, w in zip((T, H, W), window)]
        if self.ragged_windows == "pad" and any(pads):
            # Official behaviour (spec 7.8): pad the *normalised* tokens with zeros up to window multiples before
            # the qkv projection; the padded tokens become real keys (their k = qkv bias). Shift and mask then act
            # on the padded grid, exactly as the official roll does.
            x = F.pad(self.norm1(x), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
            return self.attn(x, window, shift)[:, :T, :H, :W]
        if fused:
            return self.attn.attend(norm_linear(x, self.norm1, self.attn.qkv), window, shift)
        return self.attn(self.norm1(x), window, shift)

    def _use_fused(self) -> bool:
        # The fused Functions only change what is kept for the backward, so without autograd the plain modules
        # run; they have no dropout inside, so an active MLP dropout takes the plain modules too.
        return self.fused and torch.is_grad_enabled() and (self.mlp.drop.p == 0.0 or not self.training)

    def forward(self, x: Tensor) -> Tensor:
        fused = self._use_fused()
        x = self.drop_path.residual(x, self._attention(x, fused))
        if fused:
            return self.drop_path.residual(x, norm_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2))
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """`depth` blocks sharing one configured window, then optional PatchMerging.

    Args:
        x: `(B, T, H, W, C)`.
    Returns:
        (before_downsample, after_downsample): `(B, T, H, W, C)` and `(B, T, H', W', C')` (the same tensor when
        the layer does not merge).
    """

    def __init__(self, dim, depth, num_heads, window, drop_path: list, downsample: bool, cfg: VideoEncoderConfig):
        super().__init__()
        self.use_checkpoint = cfg.gradient_checkpointing
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, num_heads, window, shifted=j % 2 == 1, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                        drop=cfg.drop_rate, drop_path=drop_path[j], backend=cfg.attention_backend,
                        ragged_windows=cfg.ragged_windows, fused=cfg.fused_blocks)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, cfg.fused_blocks) if downsample else None

    def forward(self, x: Tensor):
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class VideoEncoder(nn.Module):
    """The HTWA video encoder (official `SwinTransformer3D`, spec 1).

    Args (forward):
        video: `(B, 3, T, H, W)` float, ImageNet-normalised; H, W multiples of the patch, T of the temporal patch.
        return_local: also compute the local (clip-level) feature: the output of `cfg.local_layer` through
            `local_feat_proj` + `norm_local` (spec 1.5, the evident design).
    Returns:
        (final, local): `final` `(B, T', H', W', C_out)` after `norm` (official default 32x3x5x1024); `local` has
        the same shape when `return_local`, else None. (The released code returns `final` twice; the models
        choose per `mtc_video_features`.)
    """

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        if cfg.temporal_pos_embed:
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_frames // cfg.patch_size[0], 1, 1,
                                                               cfg.embed_dim))
            nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)
        n = sum(cfg.depths)  # stochastic depth linear 0 -> rate over all blocks (python: works under a meta device)
        dpr = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(cfg.depths):
            self.layers.append(BasicLayer(
                cfg.layer_dim(i), depth, cfg.num_heads[i], cfg.window_size[i], dpr[start:start + depth],
                downsample=i in cfg.downsample_stages, cfg=cfg,
            ))
            start += depth
        self.norm = nn.LayerNorm(cfg.out_dim)
        local_dim = cfg.layer_dim(cfg.local_layer)
        self.local_feat_proj = PatchMerging(local_dim, cfg.fused_blocks)
        self.norm_local = nn.LayerNorm(2 * local_dim)
        self.apply(_init_weights)

    def set_attention_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, WindowAttention3D):
                m.backend = backend

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enabled

    def check_input(self, video: Tensor) -> None:
        if not isinstance(video, Tensor):
            raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.ndim != 5 or video.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"video must have shape (B, {self.cfg.in_chans}, T, H, W), got {tuple(video.shape)}"
            )
        if not video.is_floating_point():
            raise TypeError(f"video must be a floating tensor, got dtype {video.dtype}")
        pt, ph, pw = self.cfg.patch_size
        T, H, W = video.shape[2:]
        if T % pt or H % ph or W % pw:
            raise ValueError(
                f"video (T, H, W)=({T}, {H}, {W}) must be multiples of patch_size {self.cfg.patch_size}; other frame "
                f"sizes are refused (spec 7.9: the official padding path changes the frame count)"
            )

    def forward(self, video: Tensor, return_local: bool = False):
        self.check_input(video)
        x = self.patch_embed(video)
        if self.cfg.temporal_pos_embed:
            if x.shape[1] != self.temporal_pos_embed.shape[1]:
                raise ValueError(f"video has {video.shape[2]} frames; temporal_pos_embed was built for "
                                 f"num_frames={self.cfg.num_frames}")
            x = x + self.temporal_pos_embed
        x = self.pos_drop(x)
        local = None
        for i, layer in enumerate(self.layers):
            before, x = layer(x)
            if return_local and i == self.cfg.local_layer:
                local = self.norm_local(self.local_feat_proj(before))
        return self.norm(x), local


def _init_weights(m: nn.Module) -> None:
    """Swin init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
