"""LF-VILA models: pre-training (stage 1 and 2) and the four fine-tuning models (spec 2-4, 6).

| class | parts (state-dict prefixes, spec 6) | loss |
| --- | --- | --- |
| `LFVILAPretrain` stage 1 | video_encoder, text_encoder (12 layers, cls, seq_relationship), 4 projections, sent_embedding | VPC + 0.25 MTC |
| `LFVILAPretrain` stage 2 | + text layers 12-23, video_token_pos; stage-1 parts frozen | MLM + 10 VTM |
| `LFVILARetrieval` | video_encoder, text_encoder, global projections, sent_embedding | VPC |
| `LFVILAQAMultichoice` | video_encoder, text_encoder (24 layers, classifier 1, span_classifier), sent_embedding, video_token_pos | CE + span |
| `LFVILAQAClassification` | video_encoder, text_encoder (24 layers, classifier), sent_embedding, video_token_pos | CE |
| `LFVILAVideoClassification` | video_encoder, video_global_proj, video_frame_proj, classifier | CE |

Inputs: `video (B, 3, T, H, W)`; text `input_ids`/`attention_mask` `(B, M, L)` (M sentences of L tokens; QA
multiple choice adds the candidate axis: `(B, K, M, L)`).

`LFVILAPretrain` and `LFVILARetrieval` also encode your own inputs: `encode_videos` (files or tensors) and
`encode_paragraphs`, the features the retrieval evaluation scores (`_EncodeMixin`, docs/own-videos.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import (
    LoadReport,
    load_checked,
    load_pretrained_weights,
    logger,
    read_pretrained_config,
    read_state_dict,
    save_pretrained,
)
from .weight_maps import bert_to_text_encoder, official_filter, swin_2d_to_3d
from .config import LFVILAConfig
from .objectives import mlm_loss, mtc_loss, span_loss, vpc_loss, vtm_shuffle
from .pooling import clip_means, global_paragraph_features, global_video_features, pool_frame_tokens
from .text_encoder import SentEmbedding, TextEncoder, VideoTokenPos
from .video_encoder import VideoEncoder

__all__ = ["LFVILAPretrain", "LFVILARetrieval", "LFVILAQAMultichoice", "LFVILAQAClassification",
           "LFVILAVideoClassification", "build_model"]


def _linear(i: int, o: int, std: float = 0.02) -> nn.Linear:
    m = nn.Linear(i, o)
    nn.init.normal_(m.weight, std=std)
    nn.init.zeros_(m.bias)
    return m


def _check_text(input_ids: Tensor, attention_mask: Tensor, ndim: int = 3) -> None:
    if not isinstance(input_ids, Tensor) or not isinstance(attention_mask, Tensor):
        raise TypeError("input_ids and attention_mask must be torch.Tensors")
    layout = "(B, M, L)" if ndim == 3 else "(B, K, M, L)"
    if input_ids.ndim != ndim:
        raise ValueError(f"input_ids must have shape {layout}, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )


def _as_state_dict(checkpoint):
    """A path (file or Hugging Face directory) is read without unpickling objects; a dict is used as is."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        return read_state_dict(checkpoint)
    return checkpoint


class LFVILABase(nn.Module):
    """Shared plumbing: video pooling, weights in and out."""

    config: LFVILAConfig

    def __init__(self, config: LFVILAConfig):
        super().__init__()
        if not isinstance(config, LFVILAConfig):
            raise TypeError(f"config must be an LFVILAConfig, got {type(config).__name__}")
        self.config = config

    # -- video --------------------------------------------------------------------------------------------------

    def _check_video_batch(self, video: Tensor, batch: Optional[int] = None) -> None:
        self.video_encoder.check_input(video)
        T = video.shape[2] // self.config.video.patch_size[0]
        if T != self.config.video.num_frames // self.config.video.patch_size[0]:
            raise ValueError(
                f"video must have {self.config.video.num_frames} frames (config.video.num_frames), got {video.shape[2]}"
            )
        if batch is not None and video.shape[0] != batch:
            raise ValueError(f"video batch {video.shape[0]} must equal the text batch {batch}")

    def video_tokens(self, video: Tensor, return_local: bool = False):
        """Encoder + per-frame pooling: `(B, T, P, C)` (official 32 x 6 x 1024), and the pooled local feature
        (or None)."""
        final, local = self.video_encoder(video, return_local=return_local)
        k = self.config.pool_kernel
        return pool_frame_tokens(final, k), (pool_frame_tokens(local, k) if local is not None else None)

    # -- weights ------------------------------------------------------------------------------------------------

    def load_official(self, checkpoint, strict: bool = True) -> LoadReport:
        """Load an official `lfvila_stage1.bin` / `lfvila_stage2.bin` (path or state dict). Fine-tuning models
        load from them as the official configs do: `strict=False`, the report names what was skipped."""
        return load_checked(self, official_filter(_as_state_dict(checkpoint), self.state_dict()), strict=strict)

    def init_video_from_swin(self, checkpoint) -> LoadReport:
        """Initialise the video encoder from a 2D Swin-B checkpoint (path, `{'model': sd}` or timm dict), inflated
        to 3D (spec 1.6). Mis-shaped tensors are refused (ValueError naming them); the report lists what the 2D
        model lacks."""
        sd3 = swin_2d_to_3d(_as_state_dict(checkpoint), self.config.video)
        report = load_checked(self.video_encoder, sd3, strict=False)
        if report.mismatched:
            raise ValueError(f"the Swin checkpoint does not fit the video config: {report}")
        return report

    def init_text_from_bert(self, checkpoint) -> LoadReport:
        """Initialise BERT (and the SentEmbedding position table, `_init_sent_embedding`) from a Hugging Face
        directory, `.safetensors` or `.bin` (bert-large-uncased layout; MiniLM for the tiny preset). The report
        names checkpoint tensors this model has no place for (e.g. BERT-large layers 12-23 in stage 1) and the
        text-tower tensors the checkpoint lacks; mis-shaped tensors are refused (ValueError naming them)."""
        mapped = bert_to_text_encoder(_as_state_dict(checkpoint), self.config.text)
        report = load_checked(self, mapped, strict=False, log=False)
        if report.mismatched:
            raise ValueError(f"the BERT checkpoint does not fit the text config: {report}")
        # only text-tower names are expected here: the rest of the model is not "missing"
        report.missing = [k for k in report.missing if k.startswith(("text_encoder.", "sent_embedding."))]
        if not report.clean:
            # the console gets the counts and groups (`LoadReport.summary`); the full names go to the debug log
            # (the run's log file)
            logger.info("BERT init: %s", report.summary())
            logger.debug("BERT init, full report: %s", report)
        return report

    def save_pretrained(self, directory: str) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, strict: bool = True, **config_changes):
        """The model saved in `directory` (`save_pretrained`); TypeError when it holds another model class."""
        cfg = read_pretrained_config(directory, **config_changes)
        saved = MODEL_CLASSES[cfg.model_type]
        if not issubclass(saved, cls):
            raise TypeError(f"{directory} holds a {saved.__name__}, not a {cls.__name__}")
        model = saved(cfg)
        load_pretrained_weights(model, directory, strict=strict)
        return model

    def set_attention_backend(self, backend: str) -> None:
        self.video_encoder.set_attention_backend(backend)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.video_encoder.set_gradient_checkpointing(enabled)
        if hasattr(self, "text_encoder"):
            self.text_encoder.bert.gradient_checkpointing = enabled


class _CrossModalMixin:
    """Video tokens for the cross-modal encoder: pooled tokens -> (width map) -> VideoTokenPos -> `(B, T*P, D)`."""

    def _build_cross_video(self, cfg: LFVILAConfig) -> None:
        if cfg.video.out_dim != cfg.text.hidden_size:
            # not in the official model (both 1024): joins a narrower video tower to the text width
            self.video_to_text = _linear(cfg.video.out_dim, cfg.text.hidden_size)
        self.video_token_pos = VideoTokenPos(cfg.video.grids()[-1][0], cfg.tokens_per_frame, cfg.text.hidden_size,
                                             eps=cfg.video_token_pos_eps)

    def cross_video_tokens(self, pooled: Tensor) -> Tensor:
        if hasattr(self, "video_to_text"):
            pooled = self.video_to_text(pooled)
        return self.video_token_pos(pooled)


@contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode (no dropout, no drop path) for the block, its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class _EncodeMixin:
    """`encode_videos` / `encode_paragraphs`: the features the retrieval evaluation scores, for your own inputs.

    The evaluation (`encode_retrieval`) takes the global VPC features: `encode_paragraphs(p) @ encode_videos(v).T`
    is its text-to-video score matrix. Subclasses give the two per-batch feature functions; this mixin adds
    batching, eval mode, no-grad, autocast and the input forms. Files are read by `lfvila_model.eval.encode`
    (imported when a path is given: the model modules read no files themselves).

    A subclass defines `_video_features(video (B, 3, F, H, W)) -> (B, E)` and
    `_paragraph_features(input_ids, attention_mask (B, M, L)) -> (B, E)`; one that does not is refused when the
    class is defined, not at the first call.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [m for m in ("_video_features", "_paragraph_features") if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"{cls.__name__} uses _EncodeMixin but does not define {', '.join(missing)}")

    @property
    def embedding_dim(self) -> int:
        """E, the width of the features (`proj_dim`, times `num_clips` with `global_features="ordered"`)."""
        cfg = self.config
        return cfg.proj_dim * (cfg.num_clips if cfg.global_features == "ordered" else 1)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_videos(self, videos: Union[Tensor, str, Sequence], batch_size: int = 8, num_workers: int = 0, *,
                      autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> Tensor:
        """L2-normalised float32 video features `(N, E)`, on the CPU, in input order.

        Args:
            videos: `(N, 3, F, H, W)` float tensor, already sampled and transformed (F = `config.video.num_frames`,
                (H, W) = `config.video.input_size`, ImageNet-normalised), or video file paths (one path or a list):
                each file, of any length and resolution, is sampled as the retrieval evaluation samples it
                (`F` frames evenly over the whole video, Resize -> CenterCrop -> Resize).
            batch_size: videos per forward pass.
            num_workers: DataLoader processes decoding files (paths only; 0 decodes in this process).
            autocast_dtype: `torch.float16` / `torch.bfloat16` to run the encoder under CUDA autocast (ignored on
                the CPU); None runs in the model's own dtype. Features are returned as float32 either way.
            progress: a tqdm bar over the files (paths only).
        Raises:
            ValueError when a file cannot be decoded, naming every such file and why (to skip unreadable files
            instead, use `lfvila_model.eval.encode.encode_video_files`).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(videos, Tensor):
            from .eval.encode import encode_video_files

            paths = [videos] if isinstance(videos, (str, bytes)) or hasattr(videos, "__fspath__") else list(videos)
            feats, _, skipped = encode_video_files(self, paths, batch_size=batch_size, num_workers=num_workers,
                                                   autocast_dtype=autocast_dtype, progress=progress)
            if skipped:
                raise ValueError(f"{len(skipped)} video(s) could not be read: "
                                 + "; ".join(f"{p}: {r}" for p, r in skipped.items()))
            return feats
        v = self.config.video
        want = (3, v.num_frames, *v.input_size)
        if videos.ndim != 5 or tuple(videos.shape[1:]) != want:
            raise ValueError(f"videos must be (N, {', '.join(map(str, want))}) (config.video num_frames and "
                             f"input_size; pass file paths to have them sampled), got {tuple(videos.shape)}")
        if not videos.is_floating_point():
            raise TypeError(f"videos must be a floating tensor (ImageNet-normalised frames), got {videos.dtype}")
        param = next(self.parameters())
        use_autocast = autocast_dtype is not None and param.device.type == "cuda"
        out = []
        with _eval_mode(self):
            for chunk in videos.split(batch_size):
                chunk = chunk.to(param.device, param.dtype, non_blocking=True)
                with torch.autocast("cuda", dtype=autocast_dtype, enabled=use_autocast):
                    out.append(self._video_features(chunk).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embedding_dim)

    @torch.no_grad()
    def encode_paragraphs(self, paragraphs: Union[str, Sequence], batch_size: int = 32,
                          tokenizer_dir: Optional[str] = None) -> Tensor:
        """L2-normalised float32 paragraph features `(N, E)`, on the CPU, in input order.

        Args:
            paragraphs: one paragraph or a list of them; a paragraph is a list of sentences, or a string that is
                split into sentences by `lfvila_model.eval.encode.split_sentences` (after `.`, `!` or `?` followed
                by white space, and at line breaks). Sentences are then merged to / padded to
                `config.num_sentences` of `config.max_sentence_len` tokens, as the evaluation's tokenizer does.
            batch_size: paragraphs per forward pass.
            tokenizer_dir: Hugging Face tokenizer folder (default: the BERT-uncased vocabulary the training and
                evaluation use, `lfvila_model.data.text.default_tokenizer_dir`).
        """
        from .eval.encode import tokenize_paragraphs

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids, mask = tokenize_paragraphs(paragraphs, self.config, tokenizer_dir)
        device = self._device()
        out = []
        with _eval_mode(self):
            for i in range(0, ids.shape[0], batch_size):
                out.append(self._paragraph_features(ids[i:i + batch_size].to(device),
                                                    mask[i:i + batch_size].to(device)).float().cpu())
        return torch.cat(out)


class LFVILAPretrain(_EncodeMixin, _CrossModalMixin, LFVILABase):
    """Pre-training model (spec 3). Stage 1: dual encoder, VPC + `mtc_weight` MTC. Stage 2: cross-modal encoder on
    top, MLM + `vtm_weight` VTM; every stage-1 part is frozen after construction (spec 3.3, 7.5)."""

    def __init__(self, config: LFVILAConfig):
        super().__init__(config)
        cfg = config
        self.stage = cfg.stage
        self.video_encoder = VideoEncoder(cfg.video)
        self.text_encoder = TextEncoder(cfg.text, with_cross=cfg.stage == 2, heads=("mlm", "vtm"))
        C, D = cfg.video.out_dim, cfg.text.hidden_size
        self.video_local_proj = _linear(C, cfg.proj_dim)
        self.text_local_proj = _linear(D, cfg.proj_dim)
        self.video_global_proj = _linear(C, cfg.proj_dim)
        self.text_global_proj = _linear(D, cfg.proj_dim)
        self.sent_embedding = SentEmbedding(cfg.text)
        self.text_encoder._init_weights(self.sent_embedding.position_embeddings)
        self.text_encoder._init_weights(self.sent_embedding.segment_embeddings)
        if cfg.stage == 2:
            self._build_cross_video(cfg)
            self._freeze_stage_one()  # after every part exists (the released code crashes here, spec 4.1)

    def train(self, mode: bool = True):
        """Stage 2 keeps the frozen video encoder in eval mode (no stochastic depth on frozen blocks), as Video
        Swin's frozen stages do (LF-VILA's `SwinTransformer3D` derives from it)."""
        super().train(mode)
        if self.stage == 2:
            self.video_encoder.eval()
        return self

    def _freeze_stage_one(self) -> None:
        n = self.config.text.num_sentence_layers + self.config.text.num_paragraph_layers
        frozen = [self.video_encoder, self.video_local_proj, self.text_local_proj, self.video_global_proj,
                  self.text_global_proj, self.sent_embedding, self.text_encoder.bert.embeddings,
                  *self.text_encoder.bert.encoder.layer[:n]]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor):
        """Sentence + paragraph encoders. Returns (sentence [CLS] `(B, M, D)`, paragraph hidden `(B, 1+M*L, D)`,
        paragraph mask `(B, 1+M*L)`)."""
        tokens, sent = self.text_encoder.encode_sentences(input_ids, attention_mask)
        para, mask = self.text_encoder.encode_paragraph(tokens, attention_mask, self.sent_embedding)
        return sent, para, mask

    def stage1_features(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict:
        """The four L2-normalised contrastive features: `video` `(B, E)`, `paragraph` `(B, E)`, `clips` `(B, M, E)`,
        `sentences` `(B, M, E)` (`video` and `paragraph` are `(B, M * E)` with `global_features="ordered"`)."""
        M = self.config.num_clips
        local = self.config.mtc_video_features == "local"
        # Text first: autograd runs the later-built graph first, so the video tower's backward comes first and frees
        # its activations (most of a step's memory) before the text tower's parameter gradients are allocated.
        sent, para, _ = self.encode_text(input_ids, attention_mask)
        pooled, pooled_local = self.video_tokens(video, return_local=local)
        clips = clip_means(pooled, M)  # B, M, C
        clip_src = clip_means(pooled_local, M) if local else clips
        mode = self.config.global_features
        return {
            "video": global_video_features(clips, self.video_global_proj, mode),
            "paragraph": global_paragraph_features(para, self.text_global_proj, mode, *input_ids.shape[1:]),
            "clips": F.normalize(self.video_local_proj(clip_src), dim=-1),
            "sentences": F.normalize(self.text_local_proj(sent), dim=-1),
        }

    def _video_features(self, video: Tensor) -> Tensor:
        """`stage1_features(...)["video"]` alone (the retrieval evaluation's video feature)."""
        self._check_video_batch(video)
        pooled, _ = self.video_tokens(video)
        return global_video_features(clip_means(pooled, self.config.num_clips), self.video_global_proj,
                                     self.config.global_features)

    def _paragraph_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """`stage1_features(...)["paragraph"]` alone (the retrieval evaluation's paragraph feature)."""
        _check_text(input_ids, attention_mask)
        _, para, _ = self.encode_text(input_ids, attention_mask)
        return global_paragraph_features(para, self.text_global_proj, self.config.global_features,
                                         *input_ids.shape[1:])

    def forward(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor, mlm_labels: Optional[Tensor] = None,
                mtc_indices: Optional[tuple] = None, generator: Optional[torch.Generator] = None) -> dict:
        """Args:
            video `(B, 3, T, H, W)`; input_ids, attention_mask `(B, M, L)` (M = num_clips);
            mlm_labels `(B, M, L)` (stage 2; -100 where not masked); mtc_indices: explicit MTC indices (stage 1).
        Returns:
            dict with `loss` and the per-term losses (stage 1: `vpc`, `mtc` and the features; stage 2: `mlm`,
            `vtm`, `vtm_logits`, `vtm_labels`).
        """
        _check_text(input_ids, attention_mask)
        if input_ids.shape[1] != self.config.num_clips:
            raise ValueError(f"input_ids must hold M = num_clips = {self.config.num_clips} sentences, got {input_ids.shape[1]}")
        self._check_video_batch(video, input_ids.shape[0])
        cfg = self.config
        if self.stage == 1:
            f = self.stage1_features(video, input_ids, attention_mask)
            vpc = vpc_loss(f["video"], f["paragraph"], cfg.temperature)
            mtc = mtc_loss(f["clips"], f["sentences"], cfg.mtc_temperature, num_key=cfg.mtc_num_key,
                           num_value=cfg.mtc_num_value, rolls=cfg.mtc_rolls, indices=mtc_indices, generator=generator)
            return {"loss": vpc + cfg.mtc_weight * mtc, "vpc": vpc, "mtc": mtc, **f}
        return self._stage2(video, input_ids, attention_mask, mlm_labels)

    def _stage2(self, video, input_ids, attention_mask, mlm_labels) -> dict:
        cfg = self.config
        B = input_ids.shape[0]
        pooled, _ = self.video_tokens(video)
        _, para, mask = self.encode_text(input_ids, attention_mask)
        vid, vtm_labels = vtm_shuffle(self.cross_video_tokens(pooled))
        hidden = self.text_encoder.cross_modal(para, mask, vid)
        vtm_logits = self.text_encoder.seq_relationship(self.text_encoder.bert.pooler(hidden))
        vtm = F.cross_entropy(vtm_logits.float(), vtm_labels)
        out = {"vtm": vtm, "vtm_logits": vtm_logits, "vtm_labels": vtm_labels}
        loss = cfg.vtm_weight * vtm
        if mlm_labels is not None:
            if mlm_labels.shape != input_ids.shape:
                raise ValueError(f"mlm_labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(mlm_labels.shape)}")
            # labels over the text part: paragraph token never predicted; only the matched (second) half counts
            labels = torch.cat([mlm_labels.new_full((B, 1), -100), mlm_labels.reshape(B, -1)], dim=1)
            labels[: B // 2] = -100
            sel = labels != -100
            # logits only where a label exists: the same loss as the official all-position logits, without the
            # (B, 201, vocab) tensor
            logits = self.text_encoder.cls.predictions(hidden[:, : labels.shape[1]][sel])
            mlm = mlm_loss(logits, labels[sel])
            out["mlm"] = mlm
            loss = loss + cfg.mlm_weight * mlm
        out["loss"] = loss
        return out


class LFVILARetrieval(_EncodeMixin, LFVILABase):
    """Paragraph-to-video retrieval (spec 4.2): the stage-1 dual encoder with global projections, VPC loss."""

    def __init__(self, config: LFVILAConfig):
        super().__init__(config)
        cfg = config
        self.video_encoder = VideoEncoder(cfg.video)
        self.text_encoder = TextEncoder(cfg.text, with_cross=False, heads=("mlm", "vtm"))  # heads unused, as released
        self.video_global_proj = _linear(cfg.video.out_dim, cfg.proj_dim)
        self.text_global_proj = _linear(cfg.text.hidden_size, cfg.proj_dim)
        self.sent_embedding = SentEmbedding(cfg.text)

    def encode_video(self, video: Tensor) -> Tensor:
        """`(B, 3, T, H, W)` -> L2-normalised `(B, E)` (`(B, M * E)` with `global_features="ordered"`)."""
        self._check_video_batch(video)
        pooled, _ = self.video_tokens(video)
        # the mean over the clip means is the mean over every pooled token (clips have equal sizes)
        clips = clip_means(pooled, self.config.num_clips)
        return global_video_features(clips, self.video_global_proj, self.config.global_features)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """`(B, M, L)` -> L2-normalised `(B, E)` paragraph features."""
        _check_text(input_ids, attention_mask)
        tokens, _ = self.text_encoder.encode_sentences(input_ids, attention_mask)
        para, _ = self.text_encoder.encode_paragraph(tokens, attention_mask, self.sent_embedding)
        return global_paragraph_features(para, self.text_global_proj, self.config.global_features,
                                         *input_ids.shape[1:])

    # the retrieval evaluation's own calls (`encode_retrieval`)
    _video_features = encode_video
    _paragraph_features = encode_text

    def forward(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict:
        _check_text(input_ids, attention_mask)
        self._check_video_batch(video, input_ids.shape[0])
        p = self.encode_text(input_ids, attention_mask)  # text first: the video backward runs first (stage 1)
        v = self.encode_video(video)
        loss = vpc_loss(v, p, self.config.temperature)
        return {"loss": loss, "video": v, "paragraph": p}


class _QABase(_CrossModalMixin, LFVILABase):
    def _build(self, heads, num_labels) -> None:
        cfg = self.config
        self.video_encoder = VideoEncoder(cfg.video)
        self.text_encoder = TextEncoder(cfg.text, with_cross=True, heads=heads, num_labels=num_labels)
        self.sent_embedding = SentEmbedding(cfg.text)
        self._build_cross_video(cfg)

    def _paragraph(self, input_ids: Tensor, attention_mask: Tensor):
        """Sentence + paragraph encoders. QA models call this before the video tower, so that autograd (later-built
        nodes first) runs the video backward before these layers' and frees the video activations before their
        parameter gradients are allocated (as `LFVILAPretrain.stage1_features`)."""
        tokens, _ = self.text_encoder.encode_sentences(input_ids, attention_mask)
        return self.text_encoder.encode_paragraph(tokens, attention_mask, self.sent_embedding)


class LFVILAQAMultichoice(_QABase):
    """Multiple-choice QA (How2QA, spec 4.2): each candidate [question, answer, subtitles] is fused with the video;
    pooled [CLS] -> `classifier` (1 logit) -> K-way CE, plus the span loss from the video tokens."""

    def __init__(self, config: LFVILAConfig):
        super().__init__(config)
        self._build(("classifier", "span"), 1)

    def forward(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None,
                span_labels: Optional[Tensor] = None) -> dict:
        """Args: video `(B, 3, T, H, W)`; input_ids, attention_mask `(B, K, M, L)`; labels `(B,)` answer index;
        span_labels `(B, T)` 1 inside the question span, 0 outside. Returns `logits (B, K)`, `span_logits
        (B, T, 2)` and `loss` when labels are given."""
        _check_text(input_ids, attention_mask, ndim=4)
        B, K, M, L = input_ids.shape
        self._check_video_batch(video, B)
        para, mask = self._paragraph(input_ids.reshape(B * K, M, L), attention_mask.reshape(B * K, M, L))
        pooled, _ = self.video_tokens(video)
        vid = self.cross_video_tokens(pooled)  # B, N, D
        vid = vid[:, None].expand(B, K, *vid.shape[1:]).reshape(B * K, *vid.shape[1:])
        te = self.text_encoder
        hidden, Lt = te.cross_modal(para, mask, vid), para.shape[1]
        logits = te.classifier(te.dropout(te.bert.pooler(hidden))).view(B, K)
        T, P = pooled.shape[1:3]
        frames = hidden[:, Lt:].reshape(B, K, T, P, -1).mean(dim=3)  # per-frame mean of its tokens
        span_logits = te.span_classifier(te.dropout(frames)).amax(dim=1)  # max over candidates: B, T, 2
        out = {"logits": logits, "span_logits": span_logits}
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            out["qa"] = loss
            if span_labels is not None:
                out["span"] = span_loss(span_logits, span_labels)
                loss = loss + self.config.span_weight * out["span"]
            out["loss"] = loss
        return out


class LFVILAQAClassification(_QABase):
    """QA as classification (VIOLIN, ActivityNet-QA, spec 4.2): pooled [CLS] -> `classifier` (num_labels) -> CE."""

    def __init__(self, config: LFVILAConfig):
        super().__init__(config)
        self._build(("classifier",), config.num_labels)

    def forward(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None) -> dict:
        _check_text(input_ids, attention_mask)
        self._check_video_batch(video, input_ids.shape[0])
        para, mask = self._paragraph(input_ids, attention_mask)
        pooled, _ = self.video_tokens(video)
        te = self.text_encoder
        hidden = te.cross_modal(para, mask, self.cross_video_tokens(pooled))
        logits = te.classifier(te.dropout(te.bert.pooler(hidden)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


class LFVILAVideoClassification(LFVILABase):
    """Video-only classification (COIN, LVU, spec 4.2): normalise(video_global_proj(mean of the pooled tokens))
    -> `classifier` -> CE. `video_frame_proj` exists for checkpoint compatibility (unused by the released head)."""

    def __init__(self, config: LFVILAConfig):
        super().__init__(config)
        cfg = config
        self.video_encoder = VideoEncoder(cfg.video)
        self.video_global_proj = _linear(cfg.video.out_dim, cfg.proj_dim)
        self.video_frame_proj = _linear(cfg.video.out_dim, cfg.proj_dim)
        self.classifier = _linear(cfg.proj_dim, cfg.num_labels)

    def forward(self, video: Tensor, labels: Optional[Tensor] = None) -> dict:
        self._check_video_batch(video)
        pooled, _ = self.video_tokens(video)
        logits = self.classifier(F.normalize(self.video_global_proj(pooled.mean(dim=(1, 2))), dim=-1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


MODEL_CLASSES = {
    "pretrain": LFVILAPretrain,
    "retrieval": LFVILARetrieval,
    "qa_multichoice": LFVILAQAMultichoice,
    "qa_classification": LFVILAQAClassification,
    "video_classification": LFVILAVideoClassification,
}

