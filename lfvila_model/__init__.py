"""lfvila_model: LF-VILA (Sun et al., NeurIPS 2022) built on the `lfvila_kernels` ops.

Configs and presets (`get_config`, `create_model`), the video encoder (HTWA), the split BERT text tower, the
pre-training and fine-tuning models, and their weights (official checkpoints, Swin/BERT inits, own format).
"""

from . import _requirements  # noqa: F401  (first: says which extra to install when one is missing)
from .config import LFVILAConfig, TextEncoderConfig, VideoEncoderConfig
from .factory import build_model, create_model, load_pretrained
from .models import (
    LFVILAPretrain,
    LFVILAQAClassification,
    LFVILAQAMultichoice,
    LFVILARetrieval,
    LFVILAVideoClassification,
)
from .presets import PRESETS, get_config, minilm_dir
from .video_encoder import VideoEncoder
from .weights import LoadReport

__all__ = [
    "LFVILAConfig", "VideoEncoderConfig", "TextEncoderConfig", "LFVILAPretrain", "LFVILARetrieval",
    "LFVILAQAMultichoice", "LFVILAQAClassification", "LFVILAVideoClassification", "VideoEncoder", "build_model",
    "create_model", "get_config", "PRESETS", "LoadReport", "load_pretrained", "minilm_dir",
]
