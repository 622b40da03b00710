"""LF-VILA's text tower: one BERT whose layers are run in three ranges (spec 2).

- sentence encoder, layers [0, S): each sentence of a paragraph on its own; sentence feature = its [CLS];
- paragraph encoder, layers [S, S+P): the M*L sentence-encoder tokens + `SentEmbedding`, with a prepended
  paragraph token (mean of the sentence [CLS] positions); paragraph feature = position 0;
- cross-modal encoder, layers [S+P, S+P+X): [paragraph tokens ; video tokens + `VideoTokenPos`], full attention.

The transformer layers and the pooler are `transformers`' `BertLayer` / `BertPooler` (their parameter names are
the official ones); with `fused_ffn` the layers' feed-forward keeps only its input and fc1's output for the
backward (`BertLayerFused`, `fused_block.mlp`). The embeddings and the MLM head are written here: the official
checkpoints store `embeddings.position_ids` as a persistent buffer and tie the MLM decoder bias to
`predictions.bias`, which the current `transformers` classes do not.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertLayer, BertPooler

from .config import TextEncoderConfig
from .fused_block import mlp

__all__ = ["BertBackbone", "TextEncoder", "SentEmbedding", "VideoTokenPos", "extended_mask"]


def extended_mask(mask: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    """Key-padding mask `(B, L)` of 1 (keep) / 0 (pad) -> additive `(B, 1, 1, L)`: 0 or `value` (-10000 as the
    official BERT, so an all-padding row keeps its unmasked softmax)."""
    return ((1.0 - mask.to(dtype)) * value)[:, None, None, :]


class BertEmbeddings(nn.Module):
    """word + position + token-type(0) embeddings -> LayerNorm -> dropout. `position_ids` is a persistent
    buffer `(1, max_position_embeddings)` as in the official checkpoints."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand(1, -1).clone())

    def forward(self, input_ids: Tensor) -> Tensor:
        """`(N, L)` int64 -> `(N, L, D)`."""
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)  # recomputed: the buffer is kept for the state dict only
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertLayerFused(BertLayer):
    """`BertLayer` whose feed-forward (intermediate dense -> GELU -> output dense) goes through `fused_block.mlp`,
    which recomputes the GELU output in the backward instead of keeping it (4 x hidden floats a token and layer).
    Dropout, the residual and the LayerNorm after it stay plain modules. The same parameters and names; the plain
    path without autograd, or with an activation other than the exact GELU."""

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.fused_ffn = config.hidden_act == "gelu"  # transformers' "gelu" is the exact erf GELU

    def feed_forward_chunk(self, attention_output):
        if not (self.fused_ffn and torch.is_grad_enabled()):
            return super().feed_forward_chunk(attention_output)
        out = self.output
        h = mlp(attention_output, self.intermediate.dense, out.dense)
        return out.LayerNorm(out.dropout(h) + attention_output)


class BertBackbone(nn.Module):
    """`embeddings`, `encoder.layer.{i}` (transformers `BertLayer`) and `pooler`, run by layer range."""

    def __init__(self, cfg: TextEncoderConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        bert_cfg = cfg.to_bert_config(num_layers)
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        layer_cls = BertLayerFused if cfg.fused_ffn else BertLayer
        self.encoder.layer = nn.ModuleList(layer_cls(bert_cfg, layer_idx=i) for i in range(num_layers))
        self.pooler = BertPooler(bert_cfg)
        self.gradient_checkpointing = False

    def run_layers(self, x: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
        """Layers [start, stop) over `x` `(N, L, D)` with key-padding `mask` `(N, L)` (1 keep, 0 pad)."""
        if stop > len(self.encoder.layer):
            raise ValueError(f"layer range [{start}, {stop}) exceeds the {len(self.encoder.layer)} built layers")
        ext = extended_mask(mask, self.cfg.attention_mask_value, x.dtype)
        for layer in self.encoder.layer[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(layer, x, ext, use_reentrant=False)
            else:
                x = layer(x, ext)
        return x


class LMPredictionHead(nn.Module):
    """MLM head `cls.predictions`: dense -> act -> LayerNorm -> decoder. The decoder weight is NOT tied to the
    word embeddings (spec 6); its bias IS the `bias` parameter (two state-dict names, one tensor)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACT2FN[cfg.hidden_act]
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: Tensor) -> Tensor:
        """`(..., D)` -> `(..., vocab)` logits."""
        x = self.transform.LayerNorm(self.act(self.transform.dense(x)))
        return self.decoder(x)


class SentEmbedding(nn.Module):
    """Paragraph-level embedding added to the sentence-encoder tokens (spec 2): absolute position over the M*L
    paragraph tokens (table copied from BERT's at init) + segment = sentence index -> LayerNorm -> dropout.

    Args:
        x: `(B, M, L, D)` sentence-encoder outputs.
    Returns:
        `(B, M*L, D)`.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.segment_embeddings = nn.Embedding(cfg.sent_type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand(1, -1).clone())

    def forward(self, x: Tensor) -> Tensor:
        B, M, L, D = x.shape
        pos = self.position_embeddings(torch.arange(M * L, device=x.device)).view(M, L, D)
        seg = self.segment_embeddings(torch.arange(M, device=x.device))[:, None, :]  # M, 1, D
        return self.dropout(self.norm(x + pos + seg)).reshape(B, M * L, D)


class VideoTokenPos(nn.Module):
    """Video-token position for the cross-modal encoder (spec 2): learned spatial `(1, 1, P, D)` + temporal
    `(1, T, 1, D)` embeddings (init 0.02 N(0, 1)) -> LayerNorm -> flattened frame-major.

    Args:
        x: `(B, T, P, D)` pooled video tokens (P = 6 per frame).
    Returns:
        `(B, T*P, D)`.
    """

    def __init__(self, num_frames: int, tokens_per_frame: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.s_pos_embed = nn.Parameter(0.02 * torch.randn(1, 1, tokens_per_frame, dim))
        self.t_pos_embed = nn.Parameter(0.02 * torch.randn(1, num_frames, 1, dim))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:3] != self.t_pos_embed.shape[1:2] + self.s_pos_embed.shape[2:3]:
            raise ValueError(
                f"video tokens must have shape (B, {self.t_pos_embed.shape[1]}, {self.s_pos_embed.shape[2]}, D), got "
                f"{tuple(x.shape)}"
            )
        return self.norm(x + self.s_pos_embed + self.t_pos_embed).flatten(1, 2)


class TextEncoder(nn.Module):
    """BERT + the heads of one task, under the official names `bert`, `cls`, `seq_relationship`,
    `classifier`, `span_classifier` (spec 6).

    Args:
        cfg: text config.
        with_cross: build the cross-modal layers too (stage 2 and QA).
        heads: which heads to build: subset of {"mlm", "vtm", "classifier", "span"}.
        num_labels: classifier outputs (1 for multiple choice).
    """

    def __init__(self, cfg: TextEncoderConfig, with_cross: bool, heads=("mlm", "vtm"), num_labels: int = 1):
        super().__init__()
        self.cfg = cfg
        self.with_cross = with_cross
        self.bert = BertBackbone(cfg, cfg.num_layers(with_cross))
        if "mlm" in heads:
            self.cls = nn.Module()
            self.cls.predictions = LMPredictionHead(cfg)
        if "vtm" in heads:
            self.seq_relationship = nn.Linear(cfg.hidden_size, 2)
        if "classifier" in heads or "span" in heads:
            self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        if "classifier" in heads:
            self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        if "span" in heads:
            self.span_classifier = nn.Linear(cfg.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.cfg.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- the three stages ------------------------------------------------------------------------------------

    def encode_sentences(self, input_ids: Tensor, attention_mask: Tensor):
        """Sentence encoder (layers [0, S)).

        Args:
            input_ids, attention_mask: `(B, M, L)` int64 / 0-1.
        Returns:
            tokens `(B, M, L, D)`, sentence features `(B, M, D)` (the [CLS] outputs).
        """
        B, M, L = input_ids.shape
        ids = input_ids.reshape(B * M, L)
        x = self.bert.embeddings(ids)
        x = self.bert.run_layers(x, attention_mask.reshape(B * M, L), 0, self.cfg.num_sentence_layers)
        x = x.view(B, M, L, -1)
        return x, x[:, :, 0]

    def encode_paragraph(self, tokens: Tensor, attention_mask: Tensor, sent_embedding: SentEmbedding):
        """Paragraph encoder (layers [S, S+P)).

        Args:
            tokens: `(B, M, L, D)` sentence-encoder outputs; attention_mask `(B, M, L)`.
            sent_embedding: the model's `SentEmbedding`.
        Returns:
            hidden `(B, 1+M*L, D)` (position 0 = paragraph token), mask `(B, 1+M*L)`.
        """
        B, M, L, D = tokens.shape
        x = sent_embedding(tokens)  # B, M*L, D
        para = x[:, ::L].mean(dim=1, keepdim=True)  # mean over the M sentence [CLS] positions, padded ones included
        x = torch.cat([para, x], dim=1)
        mask = torch.cat([attention_mask.new_ones(B, 1), attention_mask.reshape(B, M * L)], dim=1)
        s = self.cfg.num_sentence_layers
        return self.bert.run_layers(x, mask, s, s + self.cfg.num_paragraph_layers), mask

    def cross_modal(self, text: Tensor, text_mask: Tensor, video: Tensor) -> Tensor:
        """Cross-modal encoder (layers [S+P, S+P+X)) over `[text ; video]`.

        Args:
            text: `(B, Lt, D)` paragraph-encoder outputs, text_mask `(B, Lt)`; video: `(B, Nv, D)` video tokens
                with their position embedding (all valid).
        Returns:
            `(B, Lt+Nv, D)`.
        """
        if not self.with_cross:
            raise ValueError("this text encoder was built without cross-modal layers (with_cross=False)")
        x = torch.cat([text, video.to(text.dtype)], dim=1)
        mask = torch.cat([text_mask, text_mask.new_ones(video.shape[:2])], dim=1)
        s = self.cfg.num_sentence_layers + self.cfg.num_paragraph_layers
        return self.bert.run_layers(x, mask, s, s + self.cfg.num_cross_layers)
