"""Weights in and out: Swin-B 2D -> 3D inflation (spec 1.6), BERT init from MiniLM (spec 2), official state dicts
(spec 6, 7.1) and the own safetensors format."""

import os

import pytest
import torch
import torch.nn.functional as F

from lfvila_model import LFVILARetrieval, build_model, create_model, minilm_dir
from lfvila_model.weights import read_state_dict
from lfvila_model.weight_maps import swin_2d_to_3d
from tests.helpers import make_inputs, preset_config

# ---- Swin-B ---------------------------------------------------------------------------------------------------

SWIN_B_DEPTHS, SWIN_B_HEADS, SWIN_B_DIMS = (2, 2, 18, 2), (4, 8, 16, 32), (128, 256, 512, 1024)


def synthetic_swin(depths, heads, dims, kernel=4, window=12, timm=False, seed=0):
    """A random state dict with the official Swin layout (`{'model': sd}`), or timm's (downsample at stage start)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {"patch_embed.proj.weight": r(dims[0], 3, kernel, kernel), "patch_embed.proj.bias": r(dims[0]),
          "patch_embed.norm.weight": r(dims[0]), "patch_embed.norm.bias": r(dims[0])}
    n_bias = (2 * window - 1) ** 2
    for s, (d, h, c) in enumerate(zip(depths, heads, dims)):
        for b in range(d):
            p = f"layers.{s}.blocks.{b}."
            sd.update({p + "norm1.weight": r(c), p + "norm1.bias": r(c), p + "attn.qkv.weight": r(3 * c, c),
                       p + "attn.qkv.bias": r(3 * c), p + "attn.proj.weight": r(c, c), p + "attn.proj.bias": r(c),
                       p + "attn.relative_position_bias_table": r(n_bias, h),
                       p + "attn.relative_position_index": torch.zeros(window ** 2, window ** 2, dtype=torch.long),
                       p + "norm2.weight": r(c), p + "norm2.bias": r(c), p + "mlp.fc1.weight": r(4 * c, c),
                       p + "mlp.fc1.bias": r(4 * c), p + "mlp.fc2.weight": r(c, 4 * c), p + "mlp.fc2.bias": r(c)})
            if b % 2:
                sd[p + "attn_mask"] = torch.zeros(4, window ** 2, window ** 2)
        if s < len(depths) - 1:
            q = f"layers.{s + 1 if timm else s}.downsample."
            sd.update({q + "norm.weight": r(4 * c), q + "norm.bias": r(4 * c), q + "reduction.weight": r(2 * c, 4 * c)})
    sd.update({"norm.weight": r(dims[-1]), "norm.bias": r(dims[-1]), "head.weight": r(21841, dims[-1]),
               "head.bias": r(21841)})
    return sd if timm else {"model": sd}


@pytest.fixture(scope="module")
def swin_b():
    return synthetic_swin(SWIN_B_DEPTHS, SWIN_B_HEADS, SWIN_B_DIMS)


@pytest.fixture(scope="module")
def official_video_sd():
    with torch.device("meta"):
        return create_model("lfvila-official").video_encoder.state_dict()


def test_swin_b_inflation_follows_spec_formulas(swin_b, official_video_sd):
    from lfvila_model import get_config

    cfg = get_config("lfvila-official").video
    sd2, sd3 = swin_b["model"], swin_2d_to_3d(swin_b, cfg)
    # every weight of the video encoder except the derived index buffers, with the model's shapes
    want = {k for k in official_video_sd if not k.endswith("relative_position_index")}
    assert set(sd3) == want
    for k, v in sd3.items():
        assert tuple(v.shape) == tuple(official_video_sd[k].shape), k
    # patch embedding: new[o, c, 0, y, x] = K[o, c, y mod 4, x mod 4] / 4
    K, P = sd2["patch_embed.proj.weight"], sd3["patch_embed.proj.weight"]
    for y in range(8):
        for x in range(8):
            torch.testing.assert_close(P[:, :, 0, y, x], K[:, :, y % 4, x % 4] / 4)
    torch.testing.assert_close(sd3["patch_embed.proj.bias"], sd2["patch_embed.proj.bias"])
    # blocks in (stage, block) order onto (layer, block) order
    mapping = {(0, 0): (0, 0), (1, 1): (1, 1), (2, 13): (2, 13), (3, 0): (2, 14), (3, 1): (2, 15),
               (4, 0): (2, 16), (4, 1): (2, 17), (5, 0): (3, 0), (5, 1): (3, 1)}
    for (l3, b3), (s2, b2) in mapping.items():
        for n in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
            assert torch.equal(sd3[f"layers.{l3}.blocks.{b3}.{n}"], sd2[f"layers.{s2}.blocks.{b2}.{n}"])
    for l3, s2 in ((0, 0), (1, 1), (4, 2)):
        assert torch.equal(sd3[f"layers.{l3}.downsample.reduction.weight"], sd2[f"layers.{s2}.downsample.reduction.weight"])
    assert torch.equal(sd3["local_feat_proj.reduction.weight"], sd2["layers.2.downsample.reduction.weight"])
    assert torch.equal(sd3["norm_local.weight"], sd2["norm.weight"]) and torch.equal(sd3["norm.bias"], sd2["norm.bias"])
    # bias: 23x23 offsets bicubic-resized to 5x9, repeated over the 2Wt-1 temporal offsets (slowest axis)
    for l3, b3, s2, b2, wt in ((0, 1, 0, 1, 2), (5, 0, 3, 0, 32), (3, 1, 2, 15, 16)):
        t2 = sd2[f"layers.{s2}.blocks.{b2}.attn.relative_position_bias_table"]
        t3 = sd3[f"layers.{l3}.blocks.{b3}.attn.relative_position_bias_table"]
        heads = t2.shape[1]
        resized = F.interpolate(t2.T.reshape(1, heads, 23, 23), size=(5, 9), mode="bicubic", align_corners=False)[0]
        assert t3.shape == ((2 * wt - 1) * 45, heads)
        for dt in (0, wt - 1, 2 * wt - 2):
            for dh in range(5):
                for dw in (0, 4, 8):
                    torch.testing.assert_close(t3[(dt * 5 + dh) * 9 + dw], resized[:, dh, dw])


def test_swin_timm_layout_gives_the_same_inflation(swin_b):
    from lfvila_model import get_config

    cfg = get_config("lfvila-official").video
    timm = synthetic_swin(SWIN_B_DEPTHS, SWIN_B_HEADS, SWIN_B_DIMS, timm=True)
    a, b = swin_2d_to_3d(swin_b, cfg), swin_2d_to_3d(timm, cfg)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_swin_init_loads_and_patch_projection_is_the_quadrant_mean():
    # a small Swin (widths of the micro preset, 12 blocks, 1x1 kernel) into the micro model (patch 1x2x2): every
    # inflated tensor loads, and the 2x2 patch projection is the mean of the 1x1 projections of its 4 pixels
    cfg = preset_config()
    model = build_model(cfg)
    sd = synthetic_swin((2, 2, 6, 2), (1, 2, 4, 8), (32, 64, 128, 256), kernel=1, window=7)
    report = model.init_video_from_swin(sd)
    assert report.mismatched == [] and report.unexpected == []
    assert report.missing == []  # only derived buffers are not in the inflated dict, and those are recomputed
    w2 = sd["model"]["patch_embed.proj.weight"]  # (32, 3, 1, 1)
    frame = torch.randn(1, 3, 48, 80)
    conv2d = F.conv2d(frame, w2, sd["model"]["patch_embed.proj.bias"])  # per-pixel projection
    want = F.avg_pool2d(conv2d - sd["model"]["patch_embed.proj.bias"][:, None, None], 2) + sd["model"]["patch_embed.proj.bias"][:, None, None]
    got = model.video_encoder.patch_embed.proj(frame[:, :, None])[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.video_encoder.layers[3].blocks[1].attn.qkv.weight,
                       sd["model"]["layers.2.blocks.3.attn.qkv.weight"])


# ---- BERT / MiniLM -------------------------------------------------------------------------------------------

def test_bert_init_from_minilm_matches_transformers():
    from transformers import BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = preset_config("lfvila-tiny-stage2")
    model = build_model(cfg).eval()
    report = model.init_text_from_bert(minilm_dir())
    hf = BertModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()
    # what MiniLM lacks is reported by name: the 2 cross-modal layers and the pre-training heads
    assert report.unexpected == [] and report.mismatched == []
    assert any(k.startswith("text_encoder.bert.encoder.layer.6.") for k in report.missing)
    assert not any(k.startswith("text_encoder.bert.encoder.layer.5.") for k in report.missing)
    hf_sd = hf.state_dict()
    ours = model.state_dict()
    for k in ("encoder.layer.3.attention.self.query.weight", "encoder.layer.5.output.LayerNorm.bias",
              "embeddings.word_embeddings.weight", "pooler.dense.weight"):
        assert torch.equal(ours["text_encoder.bert." + k], hf_sd[k]), k
    assert torch.equal(ours["sent_embedding.position_embeddings.weight"], hf_sd["embeddings.position_embeddings.weight"])
    # sentence encoder (layers 0-3) = transformers' BertModel hidden state 4, sentence by sentence
    _, ids, mask = make_inputs(cfg, batch=2)
    with torch.no_grad():
        tokens, cls = model.text_encoder.encode_sentences(ids, mask)
        ref = hf(input_ids=ids.flatten(0, 1), attention_mask=mask.flatten(0, 1), output_hidden_states=True)
    want = ref.hidden_states[4].view_as(tokens)
    keep = mask.flatten(0, 1).any(dim=1).view(2, -1)  # all-[PAD] sentences: HF masks with finfo.min, the official -1e4
    torch.testing.assert_close(tokens[keep], want[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, tokens[:, :, 0])


# ---- official checkpoints and the own format ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_micro():
    torch.manual_seed(0)
    return build_model(preset_config()).eval()


def _features(model, seed=3):
    video, ids, mask = make_inputs(model.config, seed=seed)
    with torch.no_grad():
        return model.stage1_features(video, ids, mask)


def test_official_state_dict_loads_directly(tmp_path, stage1_micro):
    path = tmp_path / "lfvila_stage1.bin"
    torch.save({"module." + k: v for k, v in stage1_micro.state_dict().items()}, path)  # DeepSpeed-style prefix
    torch.manual_seed(1)
    fresh = build_model(preset_config()).eval()
    report = fresh.load_official(str(path))
    assert report.clean and report.loaded > 0
    a, b = _features(stage1_micro), _features(fresh)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_official_load_refuses_mismatch_and_reports_partial(stage1_micro):
    sd = dict(stage1_micro.state_dict())
    sd["video_global_proj.weight"] = torch.zeros(7, 7)
    del sd["text_local_proj.bias"]
    sd["extra.weight"] = torch.zeros(1)
    fresh = build_model(preset_config())
    with pytest.raises(ValueError, match="video_global_proj.weight"):
        fresh.load_official(sd)
    before = fresh.video_global_proj.weight.clone()
    report = fresh.load_official(sd, strict=False)
    assert [n for n, _, _ in report.mismatched] == ["video_global_proj.weight"]
    assert report.missing == ["text_local_proj.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(fresh.video_global_proj.weight, before)  # refused tensor untouched
    assert torch.equal(fresh.text_global_proj.weight, stage1_micro.text_global_proj.weight)  # the rest loaded
    # missing keys alone are refused when strict
    sd = dict(stage1_micro.state_dict())
    del sd["text_local_proj.bias"]
    with pytest.raises(ValueError, match="text_local_proj.bias"):
        fresh.load_official(sd)


def test_official_loader_grows_the_segment_table(stage1_micro):
    sd = dict(stage1_micro.state_dict())
    sd["sent_embedding.segment_embeddings.weight"] = sd["sent_embedding.segment_embeddings.weight"][:4].clone()
    fresh = build_model(preset_config())
    extra = fresh.sent_embedding.segment_embeddings.weight[4:].clone()
    assert fresh.load_official(sd).clean
    w = fresh.sent_embedding.segment_embeddings.weight
    assert torch.equal(w[:4], sd["sent_embedding.segment_embeddings.weight"]) and torch.equal(w[4:], extra)


def test_retrieval_model_loads_stage1_checkpoint_non_strict(stage1_micro):
    ret = build_model(preset_config(model_type="retrieval")).eval()
    assert isinstance(ret, LFVILARetrieval)
    report = ret.load_official(stage1_micro.state_dict(), strict=False)
    assert sorted(report.unexpected) == sorted(f"{p}_local_proj.{k}" for p in ("video", "text") for k in ("weight", "bias"))
    assert report.missing == [] and report.mismatched == []
    video, ids, mask = make_inputs(stage1_micro.config, seed=5)
    with torch.no_grad():
        f = stage1_micro.stage1_features(video, ids, mask)
        torch.testing.assert_close(ret.encode_video(video), f["video"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ret.encode_text(ids, mask), f["paragraph"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["lfvila-tiny", "lfvila-tiny-stage2"])
def test_save_pretrained_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    model = build_model(preset_config(preset)).eval()
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    again = type(model).from_pretrained(str(tmp_path)).eval()
    assert again.config == model.config
    sd, sd2 = model.state_dict(), again.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    video, ids, mask = make_inputs(model.config, seed=7)
    with torch.no_grad():
        if model.config.stage == 1:
            a, b = model.stage1_features(video, ids, mask), again.stage1_features(video, ids, mask)
        else:
            torch.manual_seed(0)
            a = model(video, ids, mask)
            torch.manual_seed(0)
            b = again(video, ids, mask)
            a, b = {"vtm_logits": a["vtm_logits"]}, {"vtm_logits": b["vtm_logits"]}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if model.config.stage == 2:  # the tie survives the round trip
        pred = again.text_encoder.cls.predictions
        assert pred.decoder.bias is pred.bias


def test_from_pretrained_refuses_wrong_class_and_config(tmp_path, stage1_micro):
    stage1_micro.save_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="LFVILAPretrain"):
        LFVILARetrieval.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="shapes do not fit"):
        type(stage1_micro).from_pretrained(str(tmp_path), proj_dim=128)
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "nope.bin"))


def test_bert_init_from_a_pretraining_checkpoint_reports_by_name(tmp_path):
    # BertForPreTraining layout (`bert.`, `cls.predictions`, `cls.seq_relationship`) with 8 layers into the micro
    # stage-1 model (6 layers): layers 6-7 are reported as unexpected, the heads load, legacy gamma/beta renamed
    from transformers import BertConfig, BertForPreTraining

    cfg = preset_config()
    t = cfg.text
    hf = BertForPreTraining(BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=8,
                                       num_attention_heads=t.num_attention_heads,
                                       intermediate_size=t.intermediate_size))
    hf.save_pretrained(str(tmp_path))
    model = build_model(cfg)
    report = model.init_text_from_bert(str(tmp_path))
    assert report.mismatched == []
    # what BERT cannot provide: the new SentEmbedding parts (its position table is BERT's copy)
    assert sorted(report.missing) == ["sent_embedding.norm.bias", "sent_embedding.norm.weight",
                                      "sent_embedding.segment_embeddings.weight"]
    assert report.unexpected and all(k.startswith(("text_encoder.bert.encoder.layer.6.", "text_encoder.bert.encoder.layer.7."))
                                     for k in report.unexpected)
    hsd = hf.state_dict()
    te = model.text_encoder
    assert torch.equal(te.seq_relationship.weight, hsd["cls.seq_relationship.weight"])
    assert torch.equal(te.cls.predictions.transform.dense.weight, hsd["cls.predictions.transform.dense.weight"])
    assert torch.equal(te.bert.encoder.layer[5].output.dense.weight, hsd["bert.encoder.layer.5.output.dense.weight"])
    # the untied decoder starts from the word embeddings (what the HF tie means) but stays a separate tensor
    assert torch.equal(te.cls.predictions.decoder.weight, te.bert.embeddings.word_embeddings.weight)
    assert te.cls.predictions.decoder.weight.data_ptr() != te.bert.embeddings.word_embeddings.weight.data_ptr()
    # legacy LayerNorm names
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hsd.items()}
    model2 = build_model(cfg)
    model2.init_text_from_bert(legacy)
    assert torch.equal(model2.text_encoder.bert.embeddings.LayerNorm.weight, hsd["bert.embeddings.LayerNorm.weight"])
    bad = dict(hsd)
    bad["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="layer.0.attention.self.query.weight"):
        build_model(cfg).init_text_from_bert(bad)
