"""The `lfvila` command line: --help of every subcommand, config overrides, info, checkpoint conversion, and a
smoke run of the demo pipeline (tiny generated set, 2 steps, evaluation, table)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lfvila_model.cli import build_parser, main
from lfvila_model.train.runconfig import apply_overrides, load_run_config
from tests.helpers import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["make-demo-data", "pretrain", "finetune", "evaluate", "convert-checkpoint", "info"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert cmd in out and "--help" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "lfvila_model", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "make-demo-data" in r.stdout


def test_overrides_and_unknown_keys(tmp_path):
    cfg = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-4", "loss.mtc_weight=0", "model.init.bert=minilm",
                                                    "train.betas=[0.9, 0.99]"])
    assert cfg["train"]["lr"] == 1e-4 and cfg["loss"]["mtc_weight"] == 0
    assert cfg["model"]["init"]["bert"] == "minilm" and cfg["train"]["betas"] == [0.9, 0.99]
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ValueError, match="unknown config sections"):
        load_run_config(None, ["trian.lr=1"])
    with pytest.raises(ValueError, match="unknown loss keys"):
        load_run_config(None, ["loss.mtc_wieght=1"])
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 0.5\n  batch_size: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_run_config(str(child), ["train.seed=9"])
    assert cfg["train"] == {"lr": 0.25, "batch_size": 3, "seed": 9}


@pytest.mark.parametrize("name", ["demo.yaml", "train_stage1.yaml", "train_stage2.yaml", "finetune_retrieval.yaml",
                                  "finetune_retrieval_cmovie.yaml", "finetune_how2qa.yaml", "finetune_violin.yaml",
                                  "finetune_actnetqa.yaml", "finetune_coin.yaml"])
def test_shipped_run_configs_load(name):
    from lfvila_model.train.runconfig import TrainConfig
    from lfvila_model.train.runner import model_config

    cfg = load_run_config(os.path.join(ROOT, "configs", name))
    TrainConfig.from_dict(cfg["train"])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        mc = model_config(cfg)
    finally:
        os.chdir(cwd)
    if name.startswith("train_stage1"):
        assert mc.mtc_weight == 0.25 and cfg["train"]["lr"] == 5e-5 and cfg["train"]["betas"] == [0.9, 0.98]
    if name.startswith("train_stage2"):
        assert mc.stage == 2 and cfg["train"]["batch_size"] == 48
    if name == "finetune_retrieval.yaml":
        assert mc.model_type == "retrieval" and cfg["train"]["schedule"] == "step"
    # spec 4.2: model, text shape, classes, epochs / warm-up / schedule / batch per GPU of each fine-tuning config
    t = cfg["train"]
    if name == "finetune_how2qa.yaml":
        assert cfg["data"]["kind"] == "how2qa" and mc.model_type == "qa_multichoice" and mc.span_weight == 1.0
        assert (mc.num_choices, mc.num_sentences, mc.max_sentence_len) == (4, 8, 50)
        assert (t["epochs"], t["warmup_epochs"], t["schedule"], t["batch_size"]) == (30, 10, "linear", 4)
    if name == "finetune_violin.yaml":
        assert cfg["data"]["kind"] == "violin" and mc.model_type == "qa_classification"
        assert (mc.num_sentences, mc.max_sentence_len, mc.num_labels) == (5, 30, 2)
        assert (t["epochs"], t["warmup_epochs"], t["schedule"], t["batch_size"]) == (100, 10, "linear", 12)
    if name == "finetune_actnetqa.yaml":
        assert cfg["data"]["kind"] == "actnetqa" and mc.model_type == "qa_classification"
        assert (mc.num_sentences, mc.max_sentence_len, mc.num_labels) == (1, 50, 1654)
        assert (t["epochs"], t["warmup_epochs"], t["schedule"], t["min_lr"], t["batch_size"]) == \
            (100, 10, "cosine", 1e-8, 16)
    if name == "finetune_coin.yaml":
        assert cfg["data"]["kind"] == "classification" and cfg["data"]["label_key"] == "recipe_type"
        assert mc.model_type == "video_classification" and mc.num_labels == 180
        assert (t["epochs"], t["schedule"]) == (500, "linear")
    if name.startswith("finetune_"):
        assert t["lr"] == 5e-5 and t["precision"] == "fp16" and mc.video.num_frames == 32
        assert tuple(mc.video.input_size) == (192, 320)


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["presets"]["lfvila-official"]["params_M"] == pytest.approx(310.29, abs=0.05)
    assert "lfvila-demo" in info["presets"]


def test_convert_checkpoint_round_trip(tmp_path):
    model = tiny_model(3)
    model.save_pretrained(str(tmp_path / "own"))
    assert main(["convert-checkpoint", str(tmp_path / "own"), str(tmp_path / "official.bin")]) == 0
    sd = torch.load(tmp_path / "official.bin", weights_only=True)
    assert "video_encoder.layers.0.blocks.0.attn.relative_position_bias_table" in sd
    model.config.save(str(tmp_path / "cfg.json"))
    assert main(["convert-checkpoint", str(tmp_path / "official.bin"), str(tmp_path / "back"), "--config",
                 str(tmp_path / "cfg.json")]) == 0
    from lfvila_model.factory import load_pretrained

    back = load_pretrained(str(tmp_path / "back"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_demo_pipeline_smoke(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert main(["make-demo-data", data, "--num-train", "8", "--num-val", "4", "--workers", "1"]) == 0
    common = ["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--set", f"data.root={data}",
              "--set", "demo.num_train=8", "--set", "demo.num_val=4", "--set", "data.num_workers=0"]
    out = str(tmp_path / "run")
    assert main(["pretrain", *common, "--out", out, "--max-steps", "2", "--set", "train.max_minutes=null",
                 "--set", "train.batch_size=4", "--set", "train.ckpt_every=1", "--no-progress"]) == 0
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["steps"] == 2 and 0 <= res["eval"]["t2v"]["R@1"] <= 100 and 0 <= res["eval"]["temporal_order"] <= 1
    assert os.path.isfile(os.path.join(out, "eval", "metrics.png"))
    assert len(open(os.path.join(out, "metrics.jsonl")).read().splitlines()) >= 2
    # resume from the step-1 checkpoint gives the same final weights
    printed = capsys.readouterr().out
    assert "temporal order" in printed and "| this run | 2 |" in printed
    assert main(["evaluate", *common, "--checkpoint", out, "--out", str(tmp_path / "m.json")]) == 0
    m = json.load(open(tmp_path / "m.json"))
    assert m["t2v"]["R@1"] == res["eval"]["t2v"]["R@1"] and m["temporal_order"] == res["eval"]["temporal_order"]
    capsys.readouterr()
    assert main(["evaluate", "--table", out, out, "--table-out", str(tmp_path / "t.md")]) == 0
    table = open(tmp_path / "t.md").read()
    assert table.count("| run (MTC weight 1.0) | 2 |") == 2  # configs/demo.yaml: loss.mtc_weight
