"""Building models (open_clip's `factory.py` habit): `build_model(config)`, `create_model(preset, ...)` and
`load_pretrained(directory)`. The model modules never import this module back."""

from __future__ import annotations

from typing import Any

from .config import LFVILAConfig
from .models import MODEL_CLASSES, LFVILABase
from .presets import PRESET_INITS, get_config, minilm_dir
from .weights import load_pretrained_weights, read_pretrained_config

__all__ = ["build_model", "create_model", "load_pretrained"]


def build_model(config: LFVILAConfig) -> LFVILABase:
    """The model class of `config.model_type`, constructed (random init)."""
    return MODEL_CLASSES[config.model_type](config)


def create_model(name: str, pretrained: bool = False, text_init=None, video_init=None, **changes: Any):
    """Build a preset's model.

    Args:
        pretrained: apply the preset's bundled inits (`PRESET_INITS`: MiniLM text for the tiny presets); presets
            without bundled weights refuse it (pass `text_init` / `video_init`, or load an official checkpoint
            with `load_official`).
        text_init: a Hugging Face BERT directory / file for `init_text_from_bert` ("minilm" = the bundled MiniLM).
        video_init: a Swin checkpoint (path or dict) for `init_video_from_swin`.
        changes: config changes (see `get_config`).
    Returns:
        the model; random init where no init was given.
    """
    if pretrained and name not in PRESET_INITS:
        raise ValueError(
            f"preset {name!r} has no bundled weights; pass text_init= (bert-large-uncased directory) and "
            f"video_init= (Swin-B .pth), or call load_official() with lfvila_stage1.bin / lfvila_stage2.bin"
        )
    model = build_model(get_config(name, **changes))
    if text_init is None and pretrained:
        text_init = PRESET_INITS[name].get("text")
    if video_init is None and pretrained:
        video_init = PRESET_INITS[name].get("video")
    if text_init is not None:
        model.init_text_from_bert(minilm_dir() if text_init == "minilm" else text_init)
    if video_init is not None:
        model.init_video_from_swin(video_init)
    return model



def load_pretrained(directory: str, strict: bool = True, **config_changes):
    """Build the model described by `directory/config.json` and load `model.safetensors` into it."""
    model = build_model(read_pretrained_config(directory, **config_changes))
    load_pretrained_weights(model, directory, strict=strict)
    return model
