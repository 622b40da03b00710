"""The tiny preset (micro-sized for the CPU) end to end: features, losses, gradients, every task model."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lfvila_model import build_model, create_model, get_config, minilm_dir
from lfvila_model.objectives import span_loss, vtm_shuffle
from lfvila_model.pooling import clip_means, pool_frame_tokens
from tests.helpers import make_inputs, preset_config


def hand_vpc(v, p, tau):
    """Spec 3.1 written out: CE over rows + CE over columns of v p^T / tau, diagonal positives, summed."""
    s = v @ p.T / tau
    idx = torch.arange(len(v))
    return -(s.log_softmax(1)[idx, idx].mean() + s.log_softmax(0)[idx, idx].mean())


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    return build_model(preset_config())


def test_tiny_preset_has_the_official_structure():
    cfg = get_config("lfvila-tiny")
    v = cfg.video
    assert v.grids() == [(16, 24, 40), (16, 12, 20), (16, 6, 10), (16, 6, 10), (16, 6, 10), (16, 3, 5), (16, 3, 5)]
    assert all(v.layer_dim(i) // h == 32 for i, h in enumerate(v.num_heads))  # head dim 32
    assert v.local_layer == 2 and cfg.tokens_per_frame == 6 and cfg.num_video_tokens == 96
    assert cfg.text.hidden_size == 384 and cfg.text.num_layers(True) == 8


def test_pooling_by_hand():
    x = torch.randn(2, 4, 3, 5, 7)
    y = pool_frame_tokens(x, (2, 3))
    assert y.shape == (2, 4, 6, 7)
    # token (r, c) of a frame = max over rows r..r+1, columns c..c+2
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(y[:, :, r * 3 + c], x[:, :, r:r + 2, c:c + 3].amax(dim=(2, 3)))
    m = clip_means(y, 2)
    torch.testing.assert_close(m[:, 1], y[:, 2:4].mean(dim=(1, 2)))


def test_stage1_features_backward_and_vpc_at_init(stage1):
    model = stage1.train()
    B = 4
    video, ids, mask = make_inputs(model.config, batch=B)
    f = model.stage1_features(video, ids, mask)
    assert f["video"].shape == (B, 256) and f["clips"].shape == (B, 4, 256) and f["sentences"].shape == (B, 4, 256)
    for k in f:
        torch.testing.assert_close(f[k].norm(dim=-1), torch.ones(f[k].shape[:-1]))
    vpc = hand_vpc(f["video"], f["paragraph"], model.config.temperature)
    # at initialisation features carry no pairing: each CE is near ln B
    assert abs(vpc.item() - 2 * math.log(B)) < 0.5, vpc.item()
    (vpc + f["clips"].sum() + f["sentences"].sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["video_encoder.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["video_encoder.layers.5.blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    assert grads["text_encoder.bert.encoder.layer.5.attention.self.query.weight"].abs().sum() > 0  # paragraph layer
    assert grads["sent_embedding.segment_embeddings.weight"].abs().sum() > 0
    # released behaviour (spec 1.5): MTC uses final features, local_feat_proj gets no gradient
    assert grads["video_encoder.local_feat_proj.reduction.weight"] is None
    model.zero_grad(set_to_none=True)


def test_local_mtc_features_use_local_feat_proj():
    torch.manual_seed(0)
    model = build_model(preset_config(mtc_video_features="local")).eval()
    video, ids, mask = make_inputs(model.config)
    f = model.stage1_features(video, ids, mask)
    f["clips"].sum().backward()
    assert model.video_encoder.local_feat_proj.reduction.weight.grad.abs().sum() > 0
    assert model.video_encoder.layers[5].blocks[0].attn.qkv.weight.grad is None  # layer 5 is after the local layer
    with torch.no_grad():
        final, local = model.video_encoder(video, return_local=True)
        pooled = pool_frame_tokens(local, (2, 3))
        want = F.normalize(model.video_local_proj(clip_means(pooled, 4)), dim=-1)
    torch.testing.assert_close(f["clips"].detach(), want)


def test_stage1_forward_with_fused_losses(stage1):
    """Needs lfvila_kernels.info_nce_loss / temporal_contrastive_loss / sample_mtc_indices (the loss-op branch)."""
    model = stage1.train()
    video, ids, mask = make_inputs(model.config, batch=4, seed=1)
    out = model(video, ids, mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["vpc"], hand_vpc(out["video"], out["paragraph"], 0.05), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out["mtc"]) and out["mtc"] > 0
    torch.testing.assert_close(out["loss"], out["vpc"] + 0.25 * out["mtc"])
    out["loss"].backward()
    assert model.video_local_proj.weight.grad.abs().sum() > 0 and model.text_local_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients(stage1):
    model = stage1.eval()
    video, ids, mask = make_inputs(model.config, seed=2)

    def grads():
        model.zero_grad(set_to_none=True)
        f = model.stage1_features(video, ids, mask)
        (f["video"] * torch.arange(256.0)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_gradient_checkpointing(True)
    try:
        ckpt = grads()
    finally:
        model.set_gradient_checkpointing(False)
    assert set(plain) == set(ckpt)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_drop_path_schedule_is_linear():
    model = build_model(preset_config())
    rates = [blk.drop_path.p for layer in model.video_encoder.layers for blk in layer.blocks]
    assert len(rates) == 12
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12), rtol=0, atol=1e-7)


def test_vtm_shuffle_by_hand():
    x = torch.arange(5.0)[:, None, None].expand(5, 2, 3)
    shuffled, labels = vtm_shuffle(x)
    assert shuffled[:, 0, 0].tolist() == [1.0, 0.0, 2.0, 3.0, 4.0]  # first half rolled by one
    assert labels.tolist() == [0, 0, 1, 1, 1]


def test_stage2_forward_backward_trains_only_the_cross_modal_part():
    torch.manual_seed(0)
    model = build_model(preset_config("lfvila-tiny-stage2")).train()
    video, ids, mask = make_inputs(model.config, batch=4)
    labels = torch.full_like(ids, -100)
    labels[:, :, 1] = ids[:, :, 1]
    labels[mask == 0] = -100
    out = model(video, ids, mask, mlm_labels=labels)
    assert out["vtm_logits"].shape == (4, 2) and out["vtm_labels"].tolist() == [0, 0, 1, 1]
    assert abs(out["vtm"].item() - math.log(2)) < 0.5 and abs(out["mlm"].item() - math.log(30522)) < 2.0
    torch.testing.assert_close(out["loss"], out["mlm"] + 10 * out["vtm"])
    out["loss"].backward()
    for n, p in model.named_parameters():
        if n.startswith(("video_encoder.", "sent_embedding.", "text_encoder.bert.embeddings.", "video_global_proj")):
            assert p.grad is None, n
    assert model.text_encoder.bert.encoder.layer[3].attention.self.query.weight.grad is None  # frozen sentence layer
    assert model.text_encoder.bert.encoder.layer[6].attention.self.query.weight.grad.abs().sum() > 0  # cross-modal
    assert model.video_token_pos.t_pos_embed.grad.abs().sum() > 0
    assert model.text_encoder.cls.predictions.decoder.weight.grad.abs().sum() > 0
    # only the matched (second) half's masked tokens count for MLM
    first_half_only = labels.clone()
    first_half_only[2:] = -100
    out = model(video, ids, mask, mlm_labels=first_half_only)
    assert out["mlm"].item() == 0.0


def test_qa_models_forward_backward():
    torch.manual_seed(0)
    cfg = preset_config("lfvila-tiny", model_type="qa_multichoice", num_sentences=3)
    model = build_model(cfg).train()
    video, ids, mask = make_inputs(cfg, batch=2)
    K = cfg.num_choices
    ids4, mask4 = ids[:, None].repeat(1, K, 1, 1), mask[:, None].repeat(1, K, 1, 1)
    span = torch.zeros(2, cfg.video.num_frames, dtype=torch.long)
    span[:, 1:3] = 1
    out = model(video, ids4, mask4, labels=torch.tensor([1, 3]), span_labels=span)
    assert out["logits"].shape == (2, K) and out["span_logits"].shape == (2, cfg.video.num_frames, 2)
    out["loss"].backward()
    assert model.text_encoder.span_classifier.weight.grad.abs().sum() > 0
    assert model.video_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # every part trains when fine-tuning
    cfg = preset_config("lfvila-tiny", model_type="qa_classification", num_labels=5, num_sentences=2)
    model = build_model(cfg).eval()
    video, ids, mask = make_inputs(cfg, batch=2)
    out = model(video, ids, mask, labels=torch.tensor([0, 4]))
    assert out["logits"].shape == (2, 5) and torch.isfinite(out["loss"])


def test_span_loss_is_class_balanced():
    logits = torch.randn(2, 6, 2)
    labels = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    # 9 out-of-span frames, 3 in-span: weights 12/18 and 12/6
    w = torch.tensor([12 / 18, 12 / 6])
    lp = logits.reshape(-1, 2).log_softmax(-1)
    y = labels.reshape(-1)
    want = -(w[y] * lp[torch.arange(12), y]).sum() / w[y].sum()
    torch.testing.assert_close(span_loss(logits, labels), want)


def test_video_classification_forward():
    torch.manual_seed(0)
    cfg = preset_config("lfvila-tiny", model_type="video_classification", num_labels=6)
    model = build_model(cfg).eval()
    video, _, _ = make_inputs(cfg, batch=2)
    out = model(video, labels=torch.tensor([1, 5]))
    assert out["logits"].shape == (2, 6) and torch.isfinite(out["loss"])
    assert "text_encoder.bert.embeddings.word_embeddings.weight" not in model.state_dict()
    assert {"video_global_proj.weight", "video_frame_proj.weight", "classifier.weight"} <= set(model.state_dict())


def test_stage2_keeps_the_frozen_video_encoder_in_eval_mode():
    model = build_model(preset_config("lfvila-tiny-stage2"))
    model.train()
    assert model.training and not model.video_encoder.training
    assert model.text_encoder.bert.encoder.layer[6].training
    stage1 = build_model(preset_config()).train()
    assert stage1.video_encoder.training


def test_tiny_preset_itself_forward_backward():
    # the real tiny preset (16 frames at 96x160, MiniLM text), not the micro variant the other tests use
    torch.manual_seed(0)
    model = create_model("lfvila-tiny", pretrained=True, video={"attention_backend": "reference"}).train()
    minilm = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    key = next(k for k in minilm if k.endswith("encoder.layer.2.attention.self.key.weight"))
    assert torch.equal(model.text_encoder.bert.encoder.layer[2].attention.self.key.weight, minilm[key])
    video, ids, mask = make_inputs(model.config, batch=2)
    f = model.stage1_features(video, ids, mask)
    assert f["clips"].shape == (2, 4, 256) and all(torch.isfinite(v).all() for v in f.values())
    (hand_vpc(f["video"], f["paragraph"], 0.05) + (f["clips"] * f["sentences"]).sum()).backward()
    g = model.video_encoder.layers[0].blocks[1].attn.relative_position_bias_table.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="no bundled weights"):
        create_model("lfvila-official", pretrained=True)


def test_ordered_global_features_compare_clip_m_with_sentence_m():
    """`global_features="ordered"`: v . p = mean over m of cos(W_vg clip_m, W_tg h_m), h_m the paragraph encoder's
    output at sentence m's first token; written out here from the parts of a model with the same weights."""
    torch.manual_seed(0)
    model = build_model(preset_config(global_features="ordered")).eval()
    B, M, L = 3, model.config.num_clips, model.config.max_sentence_len
    video, ids, mask = make_inputs(model.config, batch=B, seed=3)
    with torch.no_grad():
        f = model.stage1_features(video, ids, mask)
        E = model.config.proj_dim
        assert f["video"].shape == (B, M * E) and f["paragraph"].shape == (B, M * E)
        torch.testing.assert_close(f["video"].norm(dim=-1), torch.ones(B))
        torch.testing.assert_close(f["paragraph"].norm(dim=-1), torch.ones(B))
        pooled, _ = model.video_tokens(video)
        _, para, _ = model.encode_text(ids, mask)
        want = torch.zeros(B, B, dtype=torch.float64)
        for m in range(M):
            frames = pooled[:, m * (pooled.shape[1] // M):(m + 1) * (pooled.shape[1] // M)]
            c = model.video_global_proj(frames.mean(dim=(1, 2))).double()
            s = model.text_global_proj(para[:, 1 + m * L]).double()
            want += F.normalize(c, dim=-1) @ F.normalize(s, dim=-1).T / M
        torch.testing.assert_close((f["video"] @ f["paragraph"].T).double(), want, rtol=1e-5, atol=1e-5)
        # the official features of the same weights: one projected mean and the paragraph token
        official = build_model(preset_config()).eval()
        official.load_state_dict(model.state_dict())
        g = official.stage1_features(video, ids, mask)
        torch.testing.assert_close(g["video"], F.normalize(model.video_global_proj(pooled.mean(dim=(1, 2))), dim=-1))
        torch.testing.assert_close(g["paragraph"], F.normalize(model.text_global_proj(para[:, 0]), dim=-1))
        # the retrieval model computes the same ordered features
        retrieval = build_model(preset_config(model_type="retrieval", global_features="ordered")).eval()
        report = retrieval.load_state_dict(model.state_dict(), strict=False)
        assert not report.missing_keys
        torch.testing.assert_close(retrieval.encode_video(video), f["video"])
        torch.testing.assert_close(retrieval.encode_text(ids, mask), f["paragraph"])


def test_ordered_global_features_config_errors():
    with pytest.raises(ValueError, match="global_features must be one of"):
        get_config("lfvila-tiny", global_features="concat")
    with pytest.raises(ValueError, match=r"num_sentences \(1\) must equal num_clips \(4\)"):
        get_config("lfvila-tiny", global_features="ordered", num_sentences=1)
    assert get_config("lfvila-official").global_features == "official"
    assert get_config("lfvila-demo").global_features == "ordered"


def test_temporal_pos_embed_is_added_after_the_patch_embedding():
    cfg = preset_config(video={"temporal_pos_embed": True})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    enc = model.video_encoder
    T = cfg.video.num_frames
    assert enc.temporal_pos_embed.shape == (1, T, 1, 1, cfg.video.embed_dim)
    assert "video_encoder.temporal_pos_embed" in model.state_dict()
    assert "video_encoder.temporal_pos_embed" not in build_model(preset_config()).state_dict()  # official: absent
    video, _, _ = make_inputs(cfg, batch=2)
    with torch.no_grad():
        x = enc.patch_embed(video) + enc.temporal_pos_embed  # the embedding of frame t is added to its tokens
        for layer in enc.layers:
            _, x = layer(x)
        torch.testing.assert_close(enc(video)[0], enc.norm(x))
        # zeroed, the encoder is the official one with the same weights
        plain = build_model(preset_config()).eval()
        enc.temporal_pos_embed.zero_()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "temporal_pos_embed" not in k})
        torch.testing.assert_close(enc(video)[0], plain.video_encoder(video)[0])
    with pytest.raises(ValueError, match="temporal_pos_embed was built for num_frames=4"):
        enc(video[:, :, :2])
    from lfvila_model.train.optim import param_groups

    nodecay = [n for g in param_groups(model) if g["weight_decay"] == 0 for n in g["names"]]
    assert "video_encoder.temporal_pos_embed" in nodecay
