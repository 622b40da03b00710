"""LF-VILA configuration: plain dataclasses, validated on construction, loadable from and savable to YAML/JSON.

Three parts, one per component (spec sections 1, 2, 3):
- `VideoEncoderConfig`: the HTWA video encoder (patch embedding, six window-attention layers, PatchMerging).
- `TextEncoderConfig`: the BERT tower split into sentence / paragraph / cross-modal layer ranges.
- `LFVILAConfig`: the whole model: which task head, the pooling, projections and loss hyper-parameters.

Presets live in `presets.py`; nothing here knows their values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

__all__ = ["VideoEncoderConfig", "TextEncoderConfig", "LFVILAConfig", "MODEL_TYPES", "ATTENTION_BACKENDS"]

MODEL_TYPES = ("pretrain", "retrieval", "qa_multichoice", "qa_classification", "video_classification")
GLOBAL_FEATURES = ("official", "ordered")
ATTENTION_BACKENDS = ("auto", "cpp", "cuda", "triton", "flex", "sdpa", "reference")


def _check_int(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(value, name: str, lo: float = 0.0, hi: Optional[float] = None, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if (value <= lo if open_lo else value < lo) or (hi is not None and value > hi) or value != value:
        bound = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")


def _check_triple(value, name: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name} must be a list of 3 ints (t, h, w), got {value!r}")
    for i, v in enumerate(value):
        _check_int(v, f"{name}[{i}]")
    return tuple(value)


class _Serialisable:
    """to_dict / from_dict with unknown-key errors, and JSON/YAML files."""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, plain types only

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        kwargs = {}
        for k, v in d.items():
            sub = _SUBCONFIGS.get((cls.__name__, k))
            kwargs[k] = sub.from_dict(v) if sub is not None and isinstance(v, dict) else v
        return cls(**kwargs)

    def save(self, path: str) -> None:
        """Write the config as JSON (`.json`) or YAML (`.yaml`/`.yml`), atomically (temp file, then os.replace)."""
        text = _dump(self.to_dict(), path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str):
        """Read a JSON or YAML file written by `save` (or by hand)."""
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        elif path.endswith(".json"):
            data = json.loads(text)
        else:
            raise ValueError(f"config path must end with .json, .yaml or .yml, got {path!r}")
        return cls.from_dict(data)


def _dump(d: dict, path: str) -> str:
    if path.endswith((".yaml", ".yml")):
        import yaml

        class Dumper(yaml.SafeDumper):  # lists of scalars inline ([2, 3, 5]), everything else in block style
            pass

        def seq(dumper, data):
            flow = all(not isinstance(x, (list, dict)) for x in data)
            return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        Dumper.add_representer(list, seq)
        return yaml.dump(d, Dumper=Dumper, sort_keys=False, default_flow_style=False)
    if path.endswith(".json"):
        return json.dumps(d, indent=2) + "\n"
    raise ValueError(f"config path must end with .json, .yaml or .yml, got {path!r}")


@dataclass
class VideoEncoderConfig(_Serialisable):
    """The HTWA video encoder (spec 1.1). Defaults are the official yaml values."""

    num_frames: int = 32
    input_size: tuple = (192, 320)  # (H, W) pixels
    patch_size: tuple = (1, 8, 8)  # (t, h, w)
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple = (2, 2, 14, 2, 2, 2)
    stages: tuple = (0, 1, 2, 2, 2, 3)  # channel dim of layer i = embed_dim * 2**stages[i]
    num_heads: tuple = (4, 8, 16, 16, 16, 32)
    window_size: tuple = ((2, 3, 5), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5), (32, 3, 5))
    downsample_stages: tuple = (0, 1, 4)  # PatchMerging after these layers
    local_window: int = 8  # local features come from before the first layer with temporal window > this
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    patch_norm: bool = True
    # "pad": zero-pad the normalised tokens to window multiples before the qkv projection, as the official code
    # does (spec 7.8; padded tokens act as keys). "native": the op's ragged windows (this project's extension).
    ragged_windows: str = "pad"
    attention_backend: str = "auto"
    # Blocks run LayerNorm -> qkv and LayerNorm -> MLP as memory-saving autograd Functions
    # (lfvila_model/fused_block.py): the same numbers, 10 instead of 16 floats kept per token and channel for the
    # backward. False: the plain nn.LayerNorm / nn.Linear / nn.GELU modules, as the official code runs them.
    fused_blocks: bool = True
    gradient_checkpointing: bool = False
    # A learned per-frame embedding added after the patch embedding (not in the official encoder, whose only
    # temporal signal is the relative bias). It lets a clip's mean feature say in which order its frames showed
    # things (a colour change red -> blue vs blue -> red); the demo preset uses it. Off for the official presets.
    temporal_pos_embed: bool = False

    def __post_init__(self):
        _check_int(self.num_frames, "num_frames")
        if not isinstance(self.input_size, (list, tuple)) or len(self.input_size) != 2:
            raise ValueError(f"input_size must be (H, W), got {self.input_size!r}")
        for i, v in enumerate(self.input_size):
            _check_int(v, f"input_size[{i}]")
        self.input_size = tuple(self.input_size)
        self.patch_size = _check_triple(self.patch_size, "patch_size")
        _check_int(self.in_chans, "in_chans")
        _check_int(self.embed_dim, "embed_dim")
        n = len(self.depths)
        for name in ("depths", "stages", "num_heads", "window_size"):
            seq = getattr(self, name)
            if not isinstance(seq, (list, tuple)) or len(seq) != n or n == 0:
                raise ValueError(f"{name} must be a list with one entry per layer ({n} layers), got {seq!r}")
        self.depths = tuple(self.depths)
        self.stages = tuple(self.stages)
        self.num_heads = tuple(self.num_heads)
        self.window_size = tuple(_check_triple(w, f"window_size[{i}]") for i, w in enumerate(self.window_size))
        for i in range(n):
            _check_int(self.depths[i], f"depths[{i}]")
            _check_int(self.stages[i], f"stages[{i}]", minimum=0)
            _check_int(self.num_heads[i], f"num_heads[{i}]")
            if self.layer_dim(i) % self.num_heads[i]:
                raise ValueError(
                    f"layer {i}: channel dim {self.layer_dim(i)} (embed_dim * 2**stages[{i}]) must divide by "
                    f"num_heads[{i}]={self.num_heads[i]}"
                )
        self.downsample_stages = tuple(self.downsample_stages)
        for i, s in enumerate(self.downsample_stages):
            _check_int(s, f"downsample_stages[{i}]", minimum=0)
            if s >= n:
                raise ValueError(f"downsample_stages entries must be layer indices < {n}, got {s}")
        # PatchMerging doubles the channels: the next layer must be one stage up, others stay.
        for i in range(n - 1):
            step = self.stages[i + 1] - self.stages[i]
            want = 1 if i in self.downsample_stages else 0
            if step != want:
                raise ValueError(
                    f"stages {self.stages} do not fit downsample_stages {self.downsample_stages}: layer {i + 1} "
                    f"must be at stage {self.stages[i] + want}"
                )
        _check_int(self.local_window, "local_window")
        _check_float(self.mlp_ratio, "mlp_ratio", 0.0, open_lo=True)
        _check_float(self.drop_rate, "drop_rate", 0.0, 1.0)
        _check_float(self.drop_path_rate, "drop_path_rate", 0.0, 1.0)
        if self.ragged_windows not in ("pad", "native"):
            raise ValueError(f"ragged_windows must be 'pad' or 'native', got {self.ragged_windows!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not isinstance(self.fused_blocks, bool):
            raise TypeError(f"fused_blocks must be a bool, got {self.fused_blocks!r}")
        for axis, size, p in zip("HW", self.input_size, self.patch_size[1:]):
            if size % p:
                raise ValueError(
                    f"input_size {axis}={size} must be a multiple of patch_size {p} (spec 7.9: the official "
                    f"padding path changes the frame count, so other sizes are refused)"
                )
        if self.num_frames % self.patch_size[0]:
            raise ValueError(f"num_frames={self.num_frames} must be a multiple of patch_size[0]={self.patch_size[0]}")

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    def layer_dim(self, i: int) -> int:
        return self.embed_dim * 2 ** self.stages[i]

    @property
    def out_dim(self) -> int:
        return self.layer_dim(self.num_layers - 1)

    @property
    def local_layer(self) -> int:
        """Index of the layer whose output feeds `local_feat_proj`: the last one before the first layer whose
        temporal window exceeds `local_window` (layer 2 in the official config)."""
        for i, w in enumerate(self.window_size):
            if w[0] > self.local_window:
                return max(i - 1, 0)
        return self.num_layers - 1

    def grids(self, num_frames: Optional[int] = None, input_size: Optional[tuple] = None) -> list:
        """Token grid (T, H, W) at the input of each layer, and after the last one (len = layers + 1)."""
        t = (num_frames or self.num_frames) // self.patch_size[0]
        h, w = ((input_size or self.input_size)[i] // self.patch_size[i + 1] for i in range(2))
        out = []
        for i in range(self.num_layers):
            out.append((t, h, w))
            if i in self.downsample_stages:
                h, w = (h + 1) // 2, (w + 1) // 2
        out.append((t, h, w))
        return out


@dataclass
class TextEncoderConfig(_Serialisable):
    """The BERT tower (spec 2). Defaults are BERT-large-uncased split 8 / 4 / 12."""

    vocab_size: int = 30522
    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_sentence_layers: int = 8  # stage 0 (layers 0-7)
    num_paragraph_layers: int = 4  # stage 1 (layers 8-11)
    num_cross_layers: int = 12  # stage 2 (layers 12-23), built only by stage-2 / QA models
    sent_type_vocab_size: int = 8  # SentEmbedding segment table (sentence index)
    # Additive value for masked keys. The official HF-derived BERT adds (1 - mask) * -10000, which keeps a
    # softmax over an all-[PAD] sentence equal to the unmasked one (it matters: padded sentences enter the
    # paragraph-token mean).
    attention_mask_value: float = -10000.0
    attn_implementation: str = "sdpa"  # transformers' attention for the BERT layers: "sdpa" or "eager"
    # The BERT layers' feed-forward keeps only its input and fc1's output for the backward and recomputes the GELU
    # output (text_encoder.BertLayerFused): the same numbers, 4 x hidden floats a token and layer less. False: the
    # plain transformers BertLayer, as the official code runs it.
    fused_ffn: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_sentence_layers", "num_paragraph_layers",
                     "sent_type_vocab_size"):
            _check_int(getattr(self, name), name)
        _check_int(self.num_cross_layers, "num_cross_layers", minimum=0)
        _check_int(self.pad_token_id, "pad_token_id", minimum=0)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must divide by num_attention_heads={self.num_attention_heads}"
            )
        _check_float(self.hidden_dropout_prob, "hidden_dropout_prob", 0.0, 1.0)
        _check_float(self.attention_probs_dropout_prob, "attention_probs_dropout_prob", 0.0, 1.0)
        if not isinstance(self.fused_ffn, bool):
            raise TypeError(f"fused_ffn must be a bool, got {self.fused_ffn!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    def num_layers(self, with_cross: bool) -> int:
        n = self.num_sentence_layers + self.num_paragraph_layers
        return n + self.num_cross_layers if with_cross else n

    def to_bert_config(self, num_hidden_layers: int):
        from transformers import BertConfig

        cfg = BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg


@dataclass
class LFVILAConfig(_Serialisable):
    """The whole model: encoders, task, pooling/projections and losses (spec 1.2, 2, 3, 4.2)."""

    model_type: str = "pretrain"
    stage: int = 1  # pretraining stage (1: VPC + MTC dual encoder; 2: MLM + VTM cross-modal); ignored otherwise
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    num_clips: int = 4  # clips per video = sentences per paragraph in pre-training (M)
    num_sentences: int = 4  # sentences per paragraph (text input M)
    max_sentence_len: int = 50  # tokens per sentence (L)
    pool_kernel: tuple = (2, 3)  # per-frame MaxPool over the final grid, stride 1 (3x5 -> 2x3 = 6 tokens)
    proj_dim: int = 1024  # width of the four contrastive projections
    temperature: float = 0.05  # VPC tau (fixed)
    mtc_temperature: float = 0.05  # MTC tau_t (fixed)
    mtc_weight: float = 0.25
    mtc_num_key: int = 2
    mtc_num_value: int = 2
    mtc_rolls: tuple = (0, 1, 2)  # batch rolls of the "other" negatives; (1, 2, 3) is the clean variant (7.3)
    mtc_video_features: str = "final"  # "final" (as released, spec 1.5) or "local" (layer-2 + local_feat_proj)
    # VPC features: "official" (video = projected mean of the clips, paragraph = projected paragraph token) or
    # "ordered" (per-clip and per-sentence projections concatenated in time order: order-aware, see pooling.py)
    global_features: str = "official"
    mlm_weight: float = 1.0
    vtm_weight: float = 10.0
    num_labels: int = 2  # qa_classification / video_classification classes
    num_choices: int = 4  # qa_multichoice candidates
    span_weight: float = 1.0  # qa_multichoice span loss weight
    # LayerNorm eps of VideoTokenPos: the spec names none (unlike SentEmbedding's 1e-12), so PyTorch's default
    video_token_pos_eps: float = 1e-5

    def __post_init__(self):
        if isinstance(self.video, dict):
            self.video = VideoEncoderConfig.from_dict(self.video)
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig.from_dict(self.text)
        if not isinstance(self.video, VideoEncoderConfig):
            raise TypeError(f"video must be a VideoEncoderConfig or dict, got {type(self.video).__name__}")
        if not isinstance(self.text, TextEncoderConfig):
            raise TypeError(f"text must be a TextEncoderConfig or dict, got {type(self.text).__name__}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        for name in ("num_clips", "num_sentences", "max_sentence_len", "proj_dim", "mtc_num_key", "mtc_num_value",
                     "num_labels", "num_choices"):
            _check_int(getattr(self, name), name)
        for name in ("temperature", "mtc_temperature"):
            _check_float(getattr(self, name), name, 0.0, open_lo=True)
        _check_float(self.video_token_pos_eps, "video_token_pos_eps", 0.0, open_lo=True)
        for name in ("mtc_weight", "mlm_weight", "vtm_weight", "span_weight"):
            _check_float(getattr(self, name), name, 0.0)
        if self.mtc_video_features not in ("final", "local"):
            raise ValueError(f"mtc_video_features must be 'final' or 'local', got {self.mtc_video_features!r}")
        if self.global_features not in GLOBAL_FEATURES:
            raise ValueError(f"global_features must be one of {GLOBAL_FEATURES}, got {self.global_features!r}")
        if self.global_features == "ordered" and self.num_sentences != self.num_clips:
            raise ValueError(f"global_features='ordered' pairs clip m with sentence m: num_sentences "
                             f"({self.num_sentences}) must equal num_clips ({self.num_clips})")
        self.pool_kernel = tuple(self.pool_kernel)
        self.mtc_rolls = tuple(self.mtc_rolls)
        if self.video.num_frames % self.num_clips:
            raise ValueError(
                f"video.num_frames={self.video.num_frames} must divide by num_clips={self.num_clips} (frames per clip)"
            )
        fh, fw = self.video.grids()[-1][1:]
        if len(self.pool_kernel) != 2 or self.pool_kernel[0] > fh or self.pool_kernel[1] > fw:
            raise ValueError(f"pool_kernel must be (kh, kw) within the final grid {fh}x{fw}, got {self.pool_kernel}")
        if self.model_type == "pretrain" and self.mtc_num_key > self.num_clips:
            raise ValueError(f"mtc_num_key={self.mtc_num_key} must be <= num_clips={self.num_clips}")
        if self.model_type == "pretrain" and self.mtc_num_value > self.num_clips:
            raise ValueError(f"mtc_num_value={self.mtc_num_value} must be <= num_clips={self.num_clips}")
        if self.model_type == "pretrain" and self.num_sentences != self.num_clips:
            raise ValueError(
                f"pre-training pairs clip m with sentence m: num_sentences={self.num_sentences} must equal "
                f"num_clips={self.num_clips}"
            )
        if self.paragraph_len > self.text.max_position_embeddings:
            raise ValueError(
                f"num_sentences * max_sentence_len = {self.paragraph_len} exceeds the text position table "
                f"({self.text.max_position_embeddings})"
            )
        if self.num_sentences > self.text.sent_type_vocab_size:
            raise ValueError(
                f"num_sentences={self.num_sentences} exceeds text.sent_type_vocab_size={self.text.sent_type_vocab_size}"
            )
        if self.mtc_video_features == "local":
            v = self.video
            if 2 * v.layer_dim(v.local_layer) != v.out_dim:
                raise ValueError(
                    f"mtc_video_features='local' needs local_feat_proj (2 x {v.layer_dim(v.local_layer)}) to give "
                    f"the final width {v.out_dim}"
                )

    @property
    def paragraph_len(self) -> int:
        return self.num_sentences * self.max_sentence_len

    @property
    def tokens_per_frame(self) -> int:
        fh, fw = self.video.grids()[-1][1:]
        return (fh - self.pool_kernel[0] + 1) * (fw - self.pool_kernel[1] + 1)

    @property
    def num_video_tokens(self) -> int:
        return self.video.grids()[-1][0] * self.tokens_per_frame

    @property
    def has_cross_modal(self) -> bool:
        return (self.model_type == "pretrain" and self.stage == 2) or self.model_type.startswith("qa_")

    def replace(self, **changes: Any) -> "LFVILAConfig":
        """A copy with top-level fields changed (`video=`/`text=` accept dicts of sub-field changes)."""
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("video", "text") and isinstance(v, dict):
                d[k].update(v)
            else:
                d[k] = v
        return LFVILAConfig.from_dict(d)


_SUBCONFIGS = {("LFVILAConfig", "video"): VideoEncoderConfig, ("LFVILAConfig", "text"): TextEncoderConfig}
