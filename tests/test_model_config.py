"""Configs (presets, YAML/JSON round trips, shipped YAML files) and the errors for bad configs and bad inputs."""

import os

import pytest
import torch

from lfvila_model import LFVILAConfig, VideoEncoderConfig, build_model, get_config
from tests.helpers import make_inputs, preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_official_preset_values():
    cfg = get_config("lfvila-official")
    v, t = cfg.video, cfg.text
    assert (v.num_frames, v.input_size, v.patch_size, v.embed_dim) == (32, (192, 320), (1, 8, 8), 128)
    assert v.depths == (2, 2, 14, 2, 2, 2) and v.num_heads == (4, 8, 16, 16, 16, 32)
    assert [w[0] for w in v.window_size] == [2, 4, 8, 16, 16, 32] and v.downsample_stages == (0, 1, 4)
    assert [v.layer_dim(i) for i in range(6)] == [128, 256, 512, 512, 512, 1024]
    assert v.drop_path_rate == 0.2 and v.local_layer == 2 and v.patch_norm
    assert (t.hidden_size, t.num_sentence_layers, t.num_paragraph_layers, t.num_cross_layers) == (1024, 8, 4, 12)
    assert (cfg.num_clips, cfg.max_sentence_len, cfg.temperature, cfg.mtc_weight) == (4, 50, 0.05, 0.25)
    assert cfg.mtc_rolls == (0, 1, 2) and cfg.mtc_video_features == "final" and cfg.vtm_weight == 10
    assert cfg.num_video_tokens == 192 and cfg.paragraph_len == 200
    assert get_config("lfvila-official-stage2").stage == 2


@pytest.mark.parametrize("ext", ["json", "yaml"])
def test_config_file_round_trip(tmp_path, ext):
    cfg = get_config("lfvila-tiny", mtc_video_features="local", mtc_rolls=(1, 2, 3))
    path = str(tmp_path / f"c.{ext}")
    cfg.save(path)
    assert os.listdir(tmp_path) == [f"c.{ext}"]
    assert LFVILAConfig.load(path) == cfg


SHIPPED = [("lfvila_official_stage1.yaml", "lfvila-official"), ("lfvila_official_stage2.yaml", "lfvila-official-stage2"),
           ("lfvila_tiny.yaml", "lfvila-tiny"), ("lfvila_official_retrieval.yaml", "lfvila-official-retrieval"),
           ("lfvila_official_retrieval_cmovie.yaml", "lfvila-official-retrieval-cmovie"),
           ("lfvila_official_how2qa.yaml", "lfvila-official-how2qa"),
           ("lfvila_official_violin.yaml", "lfvila-official-violin"),
           ("lfvila_official_actnetqa.yaml", "lfvila-official-actnetqa"),
           ("lfvila_official_coin.yaml", "lfvila-official-coin"), ("lfvila_demo.yaml", "lfvila-demo")]


@pytest.mark.parametrize("name,preset", SHIPPED)
def test_shipped_yaml_configs_equal_the_presets(name, preset):
    assert LFVILAConfig.load(os.path.join(ROOT, "configs", name)) == get_config(preset)


def test_every_shipped_yaml_is_tested():
    # model YAMLs are named lfvila_*.yaml; the run configs beside them (train_*, finetune_*, demo) are tested in
    # test_cli.py
    models = [n for n in os.listdir(os.path.join(ROOT, "configs")) if n.startswith("lfvila_")]
    assert sorted(models) == sorted(n for n, _ in SHIPPED)


@pytest.mark.parametrize("changes,exc,match", [
    ({"model_type": "caption"}, ValueError, "model_type"),
    ({"stage": 3}, ValueError, "stage"),
    ({"mtc_video_features": "middle"}, ValueError, "mtc_video_features"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"num_clips": 3}, ValueError, "num_clips"),
    ({"num_sentences": 3}, ValueError, "num_sentences"),
    ({"max_sentence_len": 200}, ValueError, "position"),
    ({"pool_kernel": (4, 3)}, ValueError, "pool_kernel"),
    ({"video": {"input_size": (190, 320)}}, ValueError, "multiple of patch_size"),
    ({"video": {"num_heads": (4, 8, 16)}}, ValueError, "num_heads"),
    ({"video": {"num_heads": (4, 8, 16, 16, 16, 30)}}, ValueError, "num_heads"),
    ({"video": {"stages": (0, 1, 2, 2, 3, 3)}}, ValueError, "downsample_stages"),
    ({"video": {"window_size": [(2, 3), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5), (32, 3, 5)]}},
     ValueError, "window_size"),
    ({"video": {"attention_backend": "cudnn"}}, ValueError, "attention_backend"),
    ({"video": {"ragged_windows": "crop"}}, ValueError, "ragged_windows"),
    ({"video": {"embed_dim": 12.5}}, TypeError, "embed_dim"),
    ({"text": {"hidden_size": 1000}}, ValueError, "num_attention_heads"),
])
def test_bad_config_is_refused(changes, exc, match):
    with pytest.raises(exc, match=match):
        get_config("lfvila-official", **changes)


def test_unknown_keys_and_presets_are_refused():
    with pytest.raises(ValueError, match="unknown LFVILAConfig keys"):
        LFVILAConfig.from_dict({"model_typ": "pretrain"})
    with pytest.raises(ValueError, match="unknown VideoEncoderConfig keys"):
        VideoEncoderConfig.from_dict({"depth": [2]})
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("lfvila-huge")
    with pytest.raises(ValueError, match=r"\.json, \.yaml"):
        get_config("lfvila-tiny").save("/tmp/config.txt")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_model(preset_config()).eval()


def test_bad_inputs_are_refused(micro):
    video, ids, mask = make_inputs(micro.config)
    with pytest.raises(ValueError, match="multiples of patch_size"):  # spec 7.9
        micro.video_encoder(video[..., :47, :])
    with pytest.raises(ValueError, match="4 frames"):
        micro(video[:, :, :2], ids, mask)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        micro.video_encoder(video[:, :2])
    with pytest.raises(TypeError, match="floating"):
        micro.video_encoder(video.long())
    with pytest.raises(ValueError, match="input_ids must have shape"):
        micro(video, ids[:, 0], mask[:, 0])
    with pytest.raises(TypeError, match="int64"):
        micro(video, ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        micro(video, ids, mask[:, :, :4])
    with pytest.raises(ValueError, match="num_clips"):
        micro(video, ids[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="batch"):
        micro(video[:1], ids, mask)
    with pytest.raises(TypeError, match="LFVILAConfig"):
        type(micro)({"model_type": "pretrain"})
