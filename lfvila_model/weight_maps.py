"""Checkpoint filters: turn foreign state dicts into LF-VILA state dicts (timm's `checkpoint_filter_fn` habit:
the converters live outside the model and only rename / reshape tensors).

- `unwrap_state_dict`: `{'model': sd}`, `{'state_dict': sd}`, `{'module': sd}` containers and `module.` prefixes.
- `official_filter`: official `lfvila_stage{1,2}.bin` -> model names (identity apart from the segment-table growth
  of the official loader, spec 6).
- `swin_2d_to_3d`: Swin-B IN-22k (official `.pth` or timm layout) -> the HTWA video encoder (spec 1.6).
- `bert_to_text_encoder`: a Hugging Face BERT (`BertModel` / `BertForPreTraining` names, legacy gamma/beta too)
  -> `text_encoder.` + `sent_embedding.` (spec 2).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TextEncoderConfig, VideoEncoderConfig

__all__ = ["unwrap_state_dict", "official_filter", "swin_2d_to_3d", "bert_to_text_encoder", "inflate_patch_embed",
           "inflate_bias_table"]

StateDict = Dict[str, Tensor]


def unwrap_state_dict(obj) -> StateDict:
    """Return the tensor dict inside common checkpoint containers, without a leading `module.`."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a dict of tensors (or hold one under 'model'/'state_dict'), got {type(obj).__name__}")
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            continue  # counters, optimizer scalars: not weights
        out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise ValueError("checkpoint holds no tensors")
    return out


def official_filter(sd: StateDict, model_sd: Mapping[str, Tensor]) -> StateDict:
    """Official LF-VILA state dict -> this model's. Names are identical (spec 6); the only change is the one the
    official loader makes: a `sent_embedding.segment_embeddings.weight` with fewer rows than the model's is grown by
    appending the model's extra rows."""
    sd = unwrap_state_dict(sd)
    key = "sent_embedding.segment_embeddings.weight"
    if key in sd and key in model_sd:
        have, want = sd[key], model_sd[key]
        if have.shape[0] < want.shape[0] and have.shape[1:] == want.shape[1:]:
            sd = dict(sd)
            sd[key] = torch.cat([have, want[have.shape[0]:].to(device=have.device, dtype=have.dtype)], dim=0)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Swin 2D -> 3D (spec 1.6)

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def inflate_patch_embed(weight2d: Tensor, patch_size) -> Tensor:
    """(O, C, k, k) 2D patch kernel -> (O, C, pt, ph, pw): tiled over the larger patch and divided by the number of
    tiles and by pt, so the 3D projection of a constant-in-time patch is the mean of the 2D projections of its
    k x k tiles. For Swin-B (k = 4) into 1x8x8: new[o, c, 0, y, x] = K[o, c, y mod 4, x mod 4] / 4."""
    pt, ph, pw = patch_size
    k_h, k_w = weight2d.shape[-2:]
    if ph % k_h or pw % k_w:
        raise ValueError(f"patch_size {tuple(patch_size)} must be a multiple of the 2D kernel {(k_h, k_w)} per axis")
    reps = (ph // k_h, pw // k_w)
    w = weight2d.repeat(1, 1, *reps) / (reps[0] * reps[1] * pt)
    return w.unsqueeze(2).repeat(1, 1, pt, 1, 1)


def inflate_bias_table(table2d: Tensor, window) -> Tensor:
    """((2S-1)^2, heads) 2D relative position bias -> ((2Wt-1)(2Wh-1)(2Ww-1), heads): bicubic resize of the
    (2S-1) x (2S-1) offset map to (2Wh-1) x (2Ww-1), then repeated along the temporal offset (the slowest axis of
    the flat table), so the initial bias does not depend on dt."""
    wt, wh, ww = window
    n, heads = table2d.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"2D bias table must have a square number of rows, got {n}")
    grid = table2d.T.reshape(1, heads, side, side).float()
    target = (2 * wh - 1, 2 * ww - 1)
    if target != (side, side):
        grid = F.interpolate(grid, size=target, mode="bicubic", align_corners=False)
    flat = grid.reshape(heads, -1).T  # (2Wh-1)(2Ww-1), heads
    return flat.repeat(2 * wt - 1, 1).to(table2d.dtype)


def _timm_layout(sd: StateDict) -> bool:
    """timm (>= 0.6) keeps PatchMerging at the *start* of stages 1..3 (`layers.{i}.downsample` merges into stage i);
    the official Swin keeps it at the end of stages 0..2."""
    return "layers.0.downsample.reduction.weight" not in sd and "layers.3.downsample.reduction.weight" in sd


def swin_2d_to_3d(sd2d, cfg: VideoEncoderConfig) -> StateDict:
    """Inflate a Swin 2D state dict into the video encoder's names and shapes (spec 1.6).

    Args:
        sd2d: official Swin `.pth` content (`{'model': state_dict}`) or a timm-style state dict.
        cfg: the target video encoder config (block counts and windows).
    Returns:
        a state dict for `VideoEncoder` (no `video_encoder.` prefix) without `relative_position_index` (derived)
        and without the classifier head. Blocks are mapped in (stage, block) order onto (layer, block) order;
        PatchMerging of 2D stages 0, 1, 2 go to the 3D downsample layers in order, the last one also to
        `local_feat_proj`; the final 2D `norm` goes to `norm` and `norm_local`.
    """
    sd2d = unwrap_state_dict(sd2d)
    timm = _timm_layout(sd2d)
    blocks2d, downs2d, out = {}, {}, {}
    for k, v in sd2d.items():
        m = _BLOCK.match(k)
        if m:
            blocks2d.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = v
            continue
        m = _DOWN.match(k)
        if m:
            stage = int(m.group(1)) - (1 if timm else 0)
            downs2d.setdefault(stage, {})[m.group(2)] = v
            continue
        if k.startswith("patch_embed.norm."):
            out[k] = v
        elif k == "patch_embed.proj.weight":
            out[k] = inflate_patch_embed(v, cfg.patch_size)
        elif k == "patch_embed.proj.bias":
            out[k] = v
        elif k.startswith("norm."):
            out[k] = v
            out["norm_local." + k[len("norm."):]] = v.clone()
        # head.*, layers.*.attn_mask, anything else: discarded (the official load is non-strict)

    order2d = sorted(blocks2d)
    order3d = [(i, j) for i, d in enumerate(cfg.depths) for j in range(d)]
    if len(order2d) != len(order3d):
        raise ValueError(f"the 2D checkpoint has {len(order2d)} blocks, the video encoder {len(order3d)}")
    for (i, j), key2d in zip(order3d, order2d):
        for name, v in blocks2d[key2d].items():
            if name.endswith("relative_position_index") or name.endswith("attn_mask"):
                continue
            if name == "attn.relative_position_bias_table":
                v = inflate_bias_table(v, cfg.window_size[i])
            out[f"layers.{i}.blocks.{j}.{name}"] = v

    stages2d = sorted(downs2d)
    if len(stages2d) != len(cfg.downsample_stages):
        raise ValueError(
            f"the 2D checkpoint has {len(stages2d)} PatchMerging layers, the config {len(cfg.downsample_stages)}"
        )
    for layer3d, stage2d in zip(cfg.downsample_stages, stages2d):
        for name, v in downs2d[stage2d].items():
            out[f"layers.{layer3d}.downsample.{name}"] = v
    for name, v in downs2d[stages2d[-1]].items():
        out[f"local_feat_proj.{name}"] = v.clone()
    return out


# ---------------------------------------------------------------------------------------------------------------
# BERT (spec 2)

def _hf_rename(k: str) -> str:
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return k[len("bert."):] if k.startswith("bert.") else k


def bert_to_text_encoder(sd_hf, cfg: TextEncoderConfig, num_layers: Optional[int] = None,
                         prefix: str = "text_encoder.") -> StateDict:
    """A Hugging Face BERT state dict -> LF-VILA names.

    Args:
        sd_hf: `BertModel` (`embeddings.*`, `encoder.layer.*`, `pooler.*`) or `BertForPreTraining` / MLM
            (`bert.*`, `cls.predictions.*`, `cls.seq_relationship.*`) names; legacy `gamma`/`beta` renamed.
        num_layers: keep only checkpoint layers below this (None: keep all, so a loader can report the rest).
    Returns:
        `{prefix}bert.*`, `{prefix}cls.predictions.*`, `{prefix}seq_relationship.*` and
        `sent_embedding.position_embeddings.weight` (a copy of BERT's position table, `_init_sent_embedding`).
        A missing MLM decoder weight is initialised from the word embeddings (the tie HF checkpoints imply).
    """
    sd_hf = unwrap_state_dict(sd_hf)
    out = {}
    for k, v in sd_hf.items():
        k = _hf_rename(k)
        if k.endswith("position_ids") or k.endswith("token_type_ids"):
            continue  # derived buffers
        if k.startswith(("embeddings.", "pooler.")):
            out[f"{prefix}bert.{k}"] = v
        elif k.startswith("encoder.layer."):
            idx = int(k.split(".")[2])
            if num_layers is None or idx < num_layers:
                out[f"{prefix}bert.{k}"] = v
        elif k.startswith("cls.predictions."):
            out[f"{prefix}{k}"] = v
        elif k.startswith("cls.seq_relationship."):
            out[f"{prefix}{k[len('cls.'):]}"] = v
    word = out.get(f"{prefix}bert.embeddings.word_embeddings.weight")
    if word is not None and f"{prefix}cls.predictions.transform.dense.weight" in out:
        out.setdefault(f"{prefix}cls.predictions.decoder.weight", word.clone())
    if f"{prefix}cls.predictions.bias" in out:
        out.setdefault(f"{prefix}cls.predictions.decoder.bias", out[f"{prefix}cls.predictions.bias"])
    pos = out.get(f"{prefix}bert.embeddings.position_embeddings.weight")
    if pos is not None:
        out["sent_embedding.position_embeddings.weight"] = pos.clone()
    return out
