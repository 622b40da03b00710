"""The official preset on the meta device (no memory): token grids (spec 1.2), parameter counts and state-dict keys
(spec 6). Expected values come from the spec's tables and naming rules, not from the model."""

import math

import pytest
import torch

from lfvila_model import create_model
from lfvila_model.video_encoder import SwinBlock3D, effective_window_and_shift

# spec 1.1 / 1.2, per layer: grid at the layer's blocks, windows per sample, tokens per window, channel dim, heads
SPEC_LAYERS = [
    ((32, 24, 40), 1024, 30, 128, 4),
    ((32, 12, 20), 128, 60, 256, 8),
    ((32, 6, 10), 16, 120, 512, 16),
    ((32, 6, 10), 8, 240, 512, 16),
    ((32, 6, 10), 8, 240, 512, 16),
    ((32, 3, 5), 1, 480, 1024, 32),
]
SPEC_BIAS_ROWS = {0: 135, 2: 675, 3: 1395, 4: 1395, 5: 2835}


@pytest.fixture(scope="module")
def stage1():
    with torch.device("meta"):
        return create_model("lfvila-official", video={"attention_backend": "reference"})


@pytest.fixture(scope="module")
def stage2():
    with torch.device("meta"):
        return create_model("lfvila-official-stage2", video={"attention_backend": "reference"})


def test_token_grid_per_layer_matches_spec(stage1):
    enc = stage1.video_encoder
    seen = {}
    hooks = []
    for i, layer in enumerate(enc.layers):
        for j, blk in enumerate(layer.blocks):
            hooks.append(blk.register_forward_hook(
                lambda m, inp, out, key=(i, j): seen.__setitem__(key, (tuple(inp[0].shape), tuple(out.shape)))))
    with torch.device("meta"):
        final, local = enc(torch.empty(1, 3, 32, 192, 320), return_local=True)
    for h in hooks:
        h.remove()
    assert len(seen) == 24
    for i, (grid, n_windows, per_window, dim, heads) in enumerate(SPEC_LAYERS):
        layer = enc.layers[i]
        for j, blk in enumerate(layer.blocks):
            inp, out = seen[(i, j)]
            assert inp == (1, *grid, dim) and out == inp
            assert blk.attn.num_heads == heads and blk.attn.head_dim == 32
            window, shift = effective_window_and_shift(grid, blk.window, j % 2 == 1)
            assert math.prod(window) == per_window
            assert math.prod(math.ceil(g / w) for g, w in zip(grid, window)) == n_windows
            # odd blocks shift (0, 1, 2) except where the window covers the grid (layer 5: global, no shift)
            assert shift == ((0, 0, 0) if j % 2 == 0 or i == 5 else (0, 1, 2))
    assert tuple(final.shape) == (1, 32, 3, 5, 1024)
    assert tuple(local.shape) == (1, 32, 3, 5, 1024)  # layer 2 (6x10x512) through local_feat_proj
    pooled, _ = stage1.video_tokens(torch.empty(1, 3, 32, 192, 320, device="meta"))
    assert tuple(pooled.shape) == (1, 32, 6, 1024)  # 192 video tokens


def test_bias_tables_and_windows_match_spec(stage1):
    for i, rows in SPEC_BIAS_ROWS.items():
        heads = SPEC_LAYERS[i][4]
        for blk in stage1.video_encoder.layers[i].blocks:
            assert tuple(blk.attn.relative_position_bias_table.shape) == (rows, heads)
    assert [layer.blocks[0].window for layer in stage1.video_encoder.layers] == [
        (2, 3, 5), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5), (32, 3, 5)]
    assert [len(layer.blocks) for layer in stage1.video_encoder.layers] == [2, 2, 14, 2, 2, 2]


def _count(params):
    return sum(p.numel() for p in params)


def test_parameter_counts_match_spec(stage1, stage2):
    assert round(_count(stage1.parameters()) / 1e6, 1) == 310.3
    assert round(_count(stage1.video_encoder.parameters()) / 1e6, 1) == 89.2
    assert round(_count(stage2.parameters()) / 1e6, 1) == 461.5
    assert round(_count(p for p in stage2.parameters() if p.requires_grad) / 1e6, 1) == 184.6


# ---- expected key sets, from the naming rules of spec 6 ------------------------------------------------------

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "attn.relative_position_bias_table", "attn.relative_position_index", "norm2.weight", "norm2.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
BERT_LAYER_KEYS = [f"attention.self.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")] + [
    "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"]


def expected_keys(stage: int) -> set:
    keys = {f"video_encoder.patch_embed.{n}" for n in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")}
    for i, depth in enumerate([2, 2, 14, 2, 2, 2]):
        keys |= {f"video_encoder.layers.{i}.blocks.{j}.{k}" for j in range(depth) for k in BLOCK_KEYS}
    for i in (0, 1, 4):
        keys |= {f"video_encoder.layers.{i}.downsample.{k}" for k in ("norm.weight", "norm.bias", "reduction.weight")}
    keys |= {"video_encoder.norm.weight", "video_encoder.norm.bias", "video_encoder.norm_local.weight",
             "video_encoder.norm_local.bias", "video_encoder.local_feat_proj.norm.weight",
             "video_encoder.local_feat_proj.norm.bias", "video_encoder.local_feat_proj.reduction.weight"}
    t = "text_encoder."
    keys |= {t + "bert.embeddings." + k for k in ("word_embeddings.weight", "position_embeddings.weight",
                                                  "token_type_embeddings.weight", "LayerNorm.weight",
                                                  "LayerNorm.bias", "position_ids")}
    n_layers = 12 if stage == 1 else 24
    keys |= {f"{t}bert.encoder.layer.{i}.{k}" for i in range(n_layers) for k in BERT_LAYER_KEYS}
    keys |= {t + "bert.pooler.dense.weight", t + "bert.pooler.dense.bias"}
    keys |= {t + "cls.predictions." + k for k in ("bias", "transform.dense.weight", "transform.dense.bias",
                                                  "transform.LayerNorm.weight", "transform.LayerNorm.bias",
                                                  "decoder.weight", "decoder.bias")}
    keys |= {t + "seq_relationship.weight", t + "seq_relationship.bias"}
    keys |= {f"{p}_proj.{k}" for p in ("video_local", "text_local", "video_global", "text_global")
             for k in ("weight", "bias")}
    keys |= {"sent_embedding." + k for k in ("position_embeddings.weight", "segment_embeddings.weight",
                                             "norm.weight", "norm.bias", "position_ids")}
    if stage == 2:
        keys |= {"video_token_pos." + k for k in ("s_pos_embed", "t_pos_embed", "norm.weight", "norm.bias")}
    return keys


SPEC_SHAPES = {
    "video_encoder.patch_embed.proj.weight": (128, 3, 1, 8, 8),
    "video_encoder.local_feat_proj.reduction.weight": (1024, 2048),
    "video_encoder.layers.0.blocks.0.attn.relative_position_bias_table": (135, 4),
    "video_encoder.layers.5.blocks.1.attn.relative_position_bias_table": (2835, 32),
    "sent_embedding.position_embeddings.weight": (512, 1024),
    "sent_embedding.segment_embeddings.weight": (8, 1024),
    "video_global_proj.weight": (1024, 1024),
    "text_encoder.cls.predictions.decoder.weight": (30522, 1024),
    "text_encoder.bert.embeddings.word_embeddings.weight": (30522, 1024),
}


@pytest.mark.parametrize("stage,count", [(1, 578), (2, 774)])
def test_state_dict_keys_match_spec(stage, count, stage1, stage2):
    model = stage1 if stage == 1 else stage2
    sd = model.state_dict()
    want = expected_keys(stage)
    assert len(want) == count
    assert set(sd) == want, (sorted(set(sd) - want), sorted(want - set(sd)))
    for k, shape in SPEC_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    if stage == 2:
        assert tuple(sd["video_token_pos.s_pos_embed"].shape) == (1, 1, 6, 1024)
        assert tuple(sd["video_token_pos.t_pos_embed"].shape) == (1, 32, 1, 1024)


def test_stage2_freezes_exactly_the_stage1_parts(stage2):
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    for n in trainable:
        assert n.startswith(("text_encoder.bert.encoder.layer.", "text_encoder.bert.pooler", "text_encoder.cls",
                             "text_encoder.seq_relationship", "video_token_pos")), n
        if n.startswith("text_encoder.bert.encoder.layer."):
            assert int(n.split(".")[4]) >= 12, n
    assert "text_encoder.bert.encoder.layer.12.attention.self.query.weight" in trainable
    assert "text_encoder.cls.predictions.decoder.weight" in trainable
    # the MLM decoder is untied from the word embeddings, its bias tied to predictions.bias (spec 6)
    pred = stage2.text_encoder.cls.predictions
    assert pred.decoder.weight is not stage2.text_encoder.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias


@pytest.mark.parametrize("preset,has,lacks", [
    ("lfvila-official-retrieval", {"video_global_proj.weight": (1024, 1024), "text_global_proj.weight": (1024, 1024),
                                   "sent_embedding.segment_embeddings.weight": (8, 1024),
                                   "text_encoder.cls.predictions.decoder.weight": (30522, 1024)},
     ("video_local_proj.", "text_local_proj.", "video_token_pos.", "text_encoder.bert.encoder.layer.12.")),
    ("lfvila-official-how2qa", {"text_encoder.classifier.weight": (1, 1024), "text_encoder.span_classifier.weight": (2, 1024),
                                "video_token_pos.t_pos_embed": (1, 32, 1, 1024),
                                "text_encoder.bert.encoder.layer.23.output.dense.weight": (1024, 4096)},
     ("video_global_proj.", "video_local_proj.", "text_encoder.cls.", "text_encoder.seq_relationship.")),
    ("lfvila-official-actnetqa", {"text_encoder.classifier.weight": (1654, 1024), "video_token_pos.s_pos_embed": (1, 1, 6, 1024)},
     ("text_encoder.span_classifier.", "text_global_proj.")),
    ("lfvila-official-coin", {"video_global_proj.weight": (1024, 1024), "video_frame_proj.weight": (1024, 1024),
                              "classifier.weight": (180, 1024)},
     ("text_encoder.", "sent_embedding.")),
])
def test_finetuning_models_use_the_official_names(preset, has, lacks):
    with torch.device("meta"):
        sd = create_model(preset).state_dict()
    for k, shape in has.items():
        assert tuple(sd[k].shape) == shape, k
    for prefix in lacks:
        assert not any(k.startswith(prefix) for k in sd), prefix
    # every fine-tuning model shares the video encoder's names with stage 1
    assert {k for k in sd if k.startswith("video_encoder.")} == {k for k in expected_keys(1) if k.startswith("video_encoder.")}
