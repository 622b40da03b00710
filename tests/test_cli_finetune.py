"""`lfvila finetune` + `lfvila evaluate` for each QA / classification kind, end to end on mp4 files made here:
the shipped configs/finetune_*.yaml with the tests' tiny model, 2 steps, then the accuracy JSON of the run and of the
evaluate command (with an unreadable validation video skipped and listed)."""

import json
import os

import numpy as np
import pytest

from lfvila_model.cli import main
from lfvila_model.data import video as V
from lfvila_model.presets import get_config
from lfvila_model.train.runner import _check_kind
from tests.helpers import BERT_VOCAB, tiny_changes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def subs(n):
    return [{"text": f"subtitle {j}", "start": j, "end": j + 1} for j in range(n)]


# kind -> (config file, model changes on top of the tiny model, one annotation row for video `vid` number i)
KINDS = {
    "how2qa": ("finetune_how2qa.yaml", {"model_type": "qa_multichoice", "num_sentences": 8, "num_choices": 4},
               lambda vid, i: {"clip_id": vid, "span": [0.5, 1.5], "text_q": f"question {i}?",
                               "text_a": [f"answer {k}" for k in range(4)], "text_s": subs(i + 1),
                               "answer_idx": i % 4}),
    "violin": ("finetune_violin.yaml", {"model_type": "qa_classification", "num_sentences": 5, "num_labels": 2},
               lambda vid, i: {"clip_id": vid, "text_q": f"statement {i}.", "text_s": subs(6), "answer": i % 2}),
    "actnetqa": ("finetune_actnetqa.yaml", {"model_type": "qa_classification", "num_sentences": 1,
                                            "num_labels": 5},
                 lambda vid, i: {"video_name": vid, "question": f"what is in video {i}?", "answer": i % 5}),
    "classification": ("finetune_coin.yaml", {"model_type": "video_classification", "num_labels": 3},
                       lambda vid, i: {"video_id": vid, "recipe_type": i % 3}),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", list(KINDS))
def test_finetune_then_evaluate_reports_accuracy(kind, tmp_path, capsys):
    config, changes, row = KINDS[kind]
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        V.write_video(videos / f"v{i}.mp4", np.full((6, 32, 48, 3), 30 + 50 * i, np.uint8), fps=3, codec="mpeg4")
    write_jsonl(tmp_path / "train.jsonl", [row(f"v{i}", i) for i in range(4)])
    # validation: 3 readable videos and one that does not exist
    write_jsonl(tmp_path / "val.jsonl", [row(f"v{i}", i) for i in range(3)] + [row("absent", 3)])
    model_changes = tiny_changes(**changes, text={"vocab_size": BERT_VOCAB})  # real tokenizer ids
    get_config("lfvila-tiny", **model_changes)  # the tiny model is a valid config
    run_cfg = {
        "base": os.path.join(ROOT, "configs", config),
        "model": {"config": None, "preset": "lfvila-tiny", "changes": model_changes},
        "data": {"train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl"),
                 "video_root": str(videos), "num_workers": 0},
        "train": {"precision": "fp32", "device": "cpu", "batch_size": 2, "warmup_steps": 0, "num_threads": 1,
                  "tensorboard": False},
        "eval": {"batch_size": 2},
    }
    # JSON is YAML; tuples in the tiny configs become lists
    (tmp_path / "run.yaml").write_text(json.dumps(run_cfg))
    out = str(tmp_path / "run")
    assert main(["finetune", "--config", str(tmp_path / "run.yaml"), "--out", out, "--max-steps", "2",
                 "--no-progress"]) == 0
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["steps"] == 2
    logged = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    if kind == "how2qa":  # the span labels reached the model: the span term was trained
        assert logged["train/loss"] == pytest.approx(logged["train/qa"] + logged["train/span"], rel=1e-5)
    ev = res["eval"]
    assert ev["num_examples"] == 3 and 0 <= ev["num_correct"] <= 3
    assert ev["accuracy"] == pytest.approx(100.0 * ev["num_correct"] / 3)
    assert [os.path.basename(p) for p in ev["skipped_videos"]] == ["absent.mp4"]
    written = json.load(open(os.path.join(out, "eval", "metrics.json")))
    assert written["accuracy"] == ev["accuracy"] and written["skipped_videos"] == ev["skipped_videos"]
    assert "validation accuracy" in capsys.readouterr().out
    run_config = json.load(open(os.path.join(out, "run_config.json")))
    assert run_config["data"]["kind"] == kind

    # the evaluate command on the run's last checkpoint gives the same numbers (eval mode: no dropout)
    assert main(["evaluate", "--config", str(tmp_path / "run.yaml"), "--checkpoint", out, "--out",
                 str(tmp_path / "m.json")]) == 0
    m = json.load(open(tmp_path / "m.json"))
    assert (m["accuracy"], m["num_correct"], m["num_examples"]) == (ev["accuracy"], ev["num_correct"], 3)
    assert [os.path.basename(p) for p in m["skipped_videos"]] == ["absent.mp4"]


def test_data_kind_must_match_the_model():
    how2qa = get_config("lfvila-official-how2qa")
    _check_kind("how2qa", how2qa)
    with pytest.raises(ValueError, match="data.kind='violin' needs a qa_classification model, but the model config "
                                         "has model_type='qa_multichoice'"):
        _check_kind("violin", how2qa)
    with pytest.raises(ValueError, match=r"a video_classification model trains on data.kind in \['classification'\], "
                                         "got data.kind='retrieval'"):
        _check_kind("retrieval", get_config("lfvila-official-coin"))
    with pytest.raises(ValueError, match="data.kind must be one of"):
        _check_kind("how2QA", how2qa)
