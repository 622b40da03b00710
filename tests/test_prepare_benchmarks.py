"""`lfvila prepare activitynet|didemo` (`lfvila_model.data.benchmarks`): annotation files in the public formats and
raw videos in several containers, written here (one corrupt, some missing); the rows, their order and ids, split
lists, the re-encoded videos, the report, resumability; then the outputs used as they are by `lfvila finetune`
(configs/finetune_retrieval.yaml) and by the zero-shot `lfvila evaluate` of pre-training checkpoints."""

import json
import os

import numpy as np
import pytest

from lfvila_model.cli import main
from lfvila_model.data import benchmarks as B
from lfvila_model.data.annotations import AnnotationError, read_retrieval_jsonl
from lfvila_model.data.video import write_video
from tests.helpers import BERT_VOCAB, tiny_changes, tiny_model
from tests.test_transcode import make_video, probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def dump(path, obj):
    path.write_text(json.dumps(obj))


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


@pytest.fixture
def activitynet(tmp_path):
    """ActivityNet Captions: train (aaa: mp4 named v_aaa, bbb: mkv named without v_, ddd: no file), val_1 (ccc:
    corrupt, eee: webm in a sub-folder, fff: only blank sentences), val_2 (eee again)."""
    ann, raw = tmp_path / "ann", tmp_path / "raw"
    ann.mkdir()
    (raw / "val").mkdir(parents=True)
    make_video(raw / "v_aaa.mp4", seconds=3)
    make_video(raw / "bbb.mkv", seconds=2, codec="mpeg4")
    make_video(raw / "val" / "v_eee.webm", seconds=2, codec="libvpx")
    (raw / "v_ccc.mp4").write_bytes(os.urandom(4000))
    (raw / "v_aaa.info.json").write_text("{}")  # download metadata beside a video is not a candidate
    dump(ann / "train.json", {
        "v_aaa": {"duration": 3.0, "timestamps": [[2.0, 3.0], [0.0, 1.0], [1.0, 2.5]],
                  "sentences": ["  third thing.", "First thing.\n", " second thing. "]},
        "v_bbb": {"duration": 2.0, "timestamps": [[1.5, 2.0], [0.5, 1.5], [0.5, 1.0]],
                  "sentences": ["c", "a", "b"]},  # a tie: file order
        "v_ddd": {"duration": 9.0, "timestamps": [[0, 1]], "sentences": ["missing video"]},
    })
    dump(ann / "val_1.json", {
        "v_ccc": {"duration": 1.0, "timestamps": [[0, 1]], "sentences": ["corrupt video"]},
        "v_eee": {"duration": 2.0, "timestamps": [[1, 2], [0, 1]], "sentences": ["later", "earlier"]},
        "v_fff": {"duration": 2.0, "timestamps": [[0, 1]], "sentences": ["   "]},
    })
    dump(ann / "val_2.json", {"v_eee": {"duration": 2.0, "timestamps": [[0, 2]], "sentences": ["other annotator"]}})
    return ann, raw, tmp_path / "out"


@pytest.fixture
def didemo(tmp_path):
    """DiDeMo: train (x1.mov as a mov, x2.mp4 downloaded as x2.mkv), val (x3.avi: no file), test (x1 again)."""
    ann, raw = tmp_path / "ann", tmp_path / "raw"
    ann.mkdir()
    raw.mkdir()
    make_video(raw / "12@N00_x1.mov", seconds=3, fmt="mov")
    make_video(raw / "x2.mkv", seconds=4, codec="mpeg4")

    def item(video, text, times):
        return {"video": video, "description": text, "times": times, "annotation_id": 0,
                "dl_link": "http://example.com/" + video}

    dump(ann / "train_data.json", [
        item("12@N00_x1.mov", " starts at one ", [[2, 2], [1, 3], [3, 3], [2, 2]]),  # earliest start 1
        item("x2.mp4", "only one", [[0, 1]]),
        item("12@N00_x1.mov", "starts at zero", [[4, 4], [0, 0], [5, 5], [4, 5]]),
        item("12@N00_x1.mov", "also one, later in the file\t", [[1, 1], [1, 2]]),
    ])
    dump(ann / "val_data.json", [item("x3.avi", "no file", [[0, 0]])])
    dump(ann / "test_data.json", [item("12@N00_x1.mov", "test sentence", [[0, 0]])])
    return ann, raw, tmp_path / "out"


def test_activitynet_rows_videos_and_report(activitynet):
    ann, raw, out = activitynet
    rep = B.prepare_benchmark("activitynet", ann, raw, out, fps=3, short_side=32, workers=2, progress=False)
    assert read_rows(out / "train.jsonl") == [
        {"clip_id": "v_aaa", "text": ["First thing.", "second thing.", "third thing."]},
        {"clip_id": "v_bbb", "text": ["a", "b", "c"]},
    ]
    assert read_rows(out / "val.jsonl") == [{"clip_id": "v_eee", "text": ["earlier", "later"]}]
    assert read_rows(out / "val_2.jsonl") == [{"clip_id": "v_eee", "text": ["other annotator"]}]
    assert [r.clip_id for r in read_retrieval_jsonl(out / "train.jsonl")] == ["v_aaa", "v_bbb"]
    assert sorted(os.listdir(out / "videos")) == ["v_aaa.mp4", "v_bbb.mp4", "v_eee.mp4"]
    assert probe(out / "videos" / "v_aaa.mp4") == (9, 3.0, 42, 32)  # 3 s at 3 fps, short side 32
    assert probe(out / "videos" / "v_bbb.mp4") == (6, 3.0, 42, 32)

    assert rep["missing"] == ["v_ddd"]
    assert list(rep["unreadable"]) == ["v_ccc"] and rep["unreadable"]["v_ccc"]["path"] == str(raw / "v_ccc.mp4")
    assert "cannot open" in rep["unreadable"]["v_ccc"]["reason"]
    s = rep["splits"]
    assert (s["train"]["rows"], s["train"]["videos_in_annotations"], s["train"]["dropped_missing_video"]) == \
        (2, 3, ["v_ddd"])
    # v_fff has no sentence left after stripping: no row at all
    assert (s["val"]["rows"], s["val"]["videos_in_annotations"], s["val"]["dropped_unreadable_video"]) == \
        (1, 2, ["v_ccc"])
    assert s["val_2"]["jsonl"] == str(out / "val_2.jsonl")
    assert rep["videos"] == {"total": 5, "encoded_now": 3, "already_encoded": 0, "missing": 1, "unreadable": 1}
    assert json.load(open(out / "report.json")) == json.loads(json.dumps(rep))

    # resumable: nothing is encoded again, the same rows and report come out
    before = mtimes(out / "videos")
    again = B.prepare_benchmark("activitynet", ann, raw, out, fps=3, short_side=32, workers=2, progress=False)
    assert mtimes(out / "videos") == before
    assert again["videos"] == dict(rep["videos"], encoded_now=0, already_encoded=3)
    assert again["splits"] == rep["splits"] and read_rows(out / "val.jsonl") == [
        {"clip_id": "v_eee", "text": ["earlier", "later"]}]
    # other re-encoding options would mix two kinds of videos in one folder
    with pytest.raises(ValueError, match="prepared with other options .*fps 3 -> 2"):
        B.prepare_benchmark("activitynet", ann, raw, out, fps=2, short_side=32, progress=False)
    for f in os.listdir(out / "videos"):  # as the message says: without the old videos, a new rate is fine
        os.remove(out / "videos" / f)
    B.prepare_benchmark("activitynet", ann, raw, out, fps=2, short_side=32, workers=1, progress=False)
    assert probe(out / "videos" / "v_aaa.mp4") == (6, 2.0, 42, 32)


def test_activitynet_split_lists_match_ids_with_and_without_v(activitynet, tmp_path):
    ann, raw, out = activitynet
    (tmp_path / "train_list.txt").write_text("bbb\n\n# a comment\nv_zzz\n")  # without v_; zzz is in no split
    (tmp_path / "val_list.txt").write_text("v_eee.mp4\n")
    rep = B.prepare_benchmark("activitynet", ann, raw, out, workers=1, progress=False,
                              split_lists=[f"train={tmp_path / 'train_list.txt'}", f"val={tmp_path / 'val_list.txt'}"])
    assert read_rows(out / "train.jsonl") == [{"clip_id": "v_bbb", "text": ["a", "b", "c"]}]
    assert [r["clip_id"] for r in read_rows(out / "val.jsonl")] == ["v_eee"]
    assert rep["splits"]["train"]["not_in_split_list"] == 2 and rep["splits"]["val"]["not_in_split_list"] == 1
    assert "not_in_split_list" not in rep["splits"]["val_2"]  # no list for val_2: all its rows
    assert rep["split_list_ids_not_in_annotations"] == ["v_zzz"]
    assert rep["missing"] == [] and rep["unreadable"] == {}  # videos outside the lists are not looked at
    assert sorted(os.listdir(out / "videos")) == ["v_bbb.mp4", "v_eee.mp4"]
    assert probe(out / "videos" / "v_bbb.mp4")[2:] == (64, 48)  # no --short-side: the size is kept

    # a bare FILE restricts every split; a split left empty gets no file (and loses a stale one)
    (tmp_path / "all.txt").write_text("v_aaa\n")
    rep = B.prepare_benchmark("activitynet", ann, raw, out, workers=1, progress=False,
                              split_lists=[str(tmp_path / "all.txt")])
    assert [r["clip_id"] for r in read_rows(out / "train.jsonl")] == ["v_aaa"]
    assert rep["splits"]["val"]["rows"] == 0 and rep["splits"]["val"]["jsonl"] is None
    assert not os.path.exists(out / "val.jsonl") and not os.path.exists(out / "val_2.jsonl")
    with pytest.raises(ValueError, match="no split 'test' here"):
        B.prepare_benchmark("activitynet", ann, raw, out, split_lists=[f"test={tmp_path / 'all.txt'}"])


def test_didemo_order_ids_extensions_and_max_seconds(didemo):
    ann, raw, out = didemo
    rep = B.prepare_benchmark("didemo", ann, raw, out, fps=3, max_seconds=2, workers=2, progress=False)
    # descriptions by their earliest annotator start: zero (0), then the two starting at 1 in file order
    assert read_rows(out / "train.jsonl") == [
        {"clip_id": "12@N00_x1", "text": ["starts at zero", "starts at one", "also one, later in the file"]},
        {"clip_id": "x2", "text": ["only one"]},
    ]
    assert read_rows(out / "test.jsonl") == [{"clip_id": "12@N00_x1", "text": ["test sentence"]}]
    assert not os.path.exists(out / "val.jsonl")
    assert rep["missing"] == ["x3"] and rep["splits"]["val"]["dropped_missing_video"] == ["x3"]
    assert sorted(os.listdir(out / "videos")) == ["12@N00_x1.mp4", "x2.mp4"]
    for f in os.listdir(out / "videos"):
        assert probe(out / "videos" / f) == (6, 3.0, 64, 48)  # 2 s of 3 and 4 s videos, at 3 fps
    assert rep["options"] == {"fps": 3, "short_side": None, "max_seconds": 2}


def test_finding_raw_videos(tmp_path):
    for f in ("a.webm", "a.mp4", "sub/b.flv", "c.mp4.part", "d.mov", "d.mp4", "e.weird", "f.json"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    index = B.index_videos(tmp_path)
    assert B.find_video(index, ["a"]) == str(tmp_path / "a.mp4")  # common extensions in VIDEO_EXTENSIONS order
    assert B.find_video(index, ["b"]) == str(tmp_path / "sub" / "b.flv")
    assert B.find_video(index, ["c"]) is None  # a partial download is not a video
    assert B.find_video(index, ["d.mov", "d"]) == str(tmp_path / "d.mov")  # the exact name first
    assert B.find_video(index, ["e"]) == str(tmp_path / "e.weird")  # any other extension: PyAV decides
    assert B.find_video(index, ["f"]) is None


def test_malformed_annotations_name_the_file_and_item(tmp_path):
    dump(tmp_path / "train.json", {"v_a": {"timestamps": [[0, 1]], "sentences": ["x", "y"]}})
    with pytest.raises(AnnotationError, match=r"train.json\['v_a'\]: 'timestamps' must be a list of one"):
        B.read_activitynet_captions(tmp_path / "train.json")
    dump(tmp_path / "d.json", [{"video": "a.mp4", "description": "x", "times": [[0, 1]]},
                               {"video": "a.mp4", "description": "y", "times": [["late", 1]]}])
    with pytest.raises(AnnotationError, match=r"d.json\[1\]: times\[0\]\[0\] must be a number"):
        B.read_didemo(tmp_path / "d.json")
    dump(tmp_path / "e.json", [{"video": "a.mp4", "description": "x", "times": [[0, 1]]},
                               {"video": "a.avi", "description": "y", "times": [[0, 1]]}])
    with pytest.raises(AnnotationError, match="the same clip_id 'a'"):
        B.read_didemo(tmp_path / "e.json")
    with pytest.raises(FileNotFoundError, match="none of the didemo annotation files"):
        B.prepare_benchmark("didemo", tmp_path, tmp_path, tmp_path / "out", progress=False)


def test_prepare_cli_help_and_end_to_end(didemo, capsys):
    for argv in (["prepare", "--help"], ["prepare", "activitynet", "--help"], ["prepare", "didemo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "activitynet" in out and "--split-list" in out and "--max-seconds" in out and "v_ prefix" in out
    with pytest.raises(SystemExit):
        main(["prepare", "activitynet", "--max-seconds", "3", "--annotations", "a", "--videos", "v", "--out", "o"])
    capsys.readouterr()
    ann, raw, out_dir = didemo
    assert main(["prepare", "didemo", "--annotations", str(ann), "--videos", str(raw), "--out", str(out_dir),
                 "--short-side", "24", "--workers", "2", "--max-seconds", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 rows" in printed and "1 missing" in printed and "2 encoded now" in printed
    assert probe(out_dir / "videos" / "x2.mp4") == (3, 3.0, 32, 24)


def model_changes(model_type):
    return tiny_changes(model_type=model_type, text={"vocab_size": BERT_VOCAB})  # real token ids


FAST_TRAIN = {"precision": "fp32", "device": "cpu", "batch_size": 2, "warmup_steps": 0, "num_threads": 1,
              "tensorboard": False}


def test_finetune_config_reads_the_prepared_data(activitynet, tmp_path):
    """configs/finetune_retrieval.yaml unchanged but for the tests' tiny model and a short run, the data from --set."""
    ann, raw, out = activitynet
    B.prepare_benchmark("activitynet", ann, raw, out, short_side=24, workers=2, progress=False)
    run = {"base": os.path.join(ROOT, "configs", "finetune_retrieval.yaml"),
           "model": {"config": None, "preset": "lfvila-tiny", "changes": model_changes("retrieval")},
           "data": {"num_workers": 0}, "train": FAST_TRAIN, "eval": {"batch_size": 2}}
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    assert main(["finetune", "-c", str(tmp_path / "run.yaml"), "--set", f"data.train={out / 'train.jsonl'}",
                 "--set", f"data.val={out / 'val.jsonl'}", "--set", f"data.video_root={out / 'videos'}",
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"]) == 0
    res = json.load(open(tmp_path / "run" / "result.json"))
    assert res["steps"] == 2 and res["eval"]["num_queries"] == 1 and res["eval"]["skipped_videos"] == []


def _pretrain_run(tmp_path):
    """A 2-step `lfvila pretrain` run of a tiny stage-1 model on clip files made here; returns its directory."""
    clips = tmp_path / "clips"
    rows = []
    for v in range(2):
        (clips / f"p{v}").mkdir(parents=True)
        for c in range(4):
            write_video(clips / f"p{v}" / f"p{v}.{c}.mp4", np.full((2, 24, 40, 3), 40 * v + 10 * c, np.uint8),
                        codec="mpeg4")
        rows.append(json.dumps([{"clip_id": f"p{v}.{c}.mp4", "text": f"clip {c}"} for c in range(4)]))
    (tmp_path / "pretrain.jsonl").write_text("\n".join(rows) + "\n")
    run = {"model": {"preset": "lfvila-tiny", "changes": model_changes("pretrain")},
           "data": {"kind": "pretrain", "train": str(tmp_path / "pretrain.jsonl"), "video_root": str(clips),
                    "num_workers": 0}, "train": FAST_TRAIN}
    (tmp_path / "pretrain.yaml").write_text(json.dumps(run))
    assert main(["pretrain", "-c", str(tmp_path / "pretrain.yaml"), "--out", str(tmp_path / "pre"),
                 "--max-steps", "2", "--no-progress"]) == 0
    return tmp_path / "pre"


def test_zero_shot_evaluation_of_pretraining_checkpoints(didemo, tmp_path, capsys):
    """`lfvila evaluate --checkpoint DIR --set data.val=... --set data.video_root=...`, no config file: a
    `save_pretrained` directory of a pre-training model, and a `lfvila pretrain` run directory."""
    ann, raw, out = didemo
    B.prepare_benchmark("didemo", ann, raw, out, short_side=24, workers=2, progress=False)
    data = ["--set", f"data.val={out / 'train.jsonl'}", "--set", f"data.video_root={out / 'videos'}"]
    model = tiny_model(0, text={"vocab_size": BERT_VOCAB})
    model.save_pretrained(str(tmp_path / "stage1"))
    for ckpt in (tmp_path / "stage1", _pretrain_run(tmp_path)):
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(ckpt), *data, "--out", str(tmp_path / "m.json")]) == 0
        printed = json.loads(capsys.readouterr().out)
        m = json.load(open(tmp_path / "m.json"))
        assert m["num_queries"] == 2 and m["skipped_videos"] == [] and 0 <= m["t2v"]["R@1"] <= 100
        assert printed["t2v"] == m["t2v"] and printed["v2t"] == m["v2t"]
        assert os.path.isfile(tmp_path / "m.png")


def test_evaluate_runs_on_the_training_device(didemo, tmp_path):
    """`lfvila evaluate` places the model as training does (train.device, auto: the GPU when there is one)."""
    import torch

    ann, raw, out = didemo
    B.prepare_benchmark("didemo", ann, raw, out, short_side=24, workers=1, progress=False)
    tiny_model(0, text={"vocab_size": BERT_VOCAB}).save_pretrained(str(tmp_path / "stage1"))
    argv = ["evaluate", "--checkpoint", str(tmp_path / "stage1"), "--set", f"data.val={out / 'train.jsonl'}",
            "--set", f"data.video_root={out / 'videos'}", "--out", str(tmp_path / "m.json"), "--set"]
    assert main(argv + ["train.device=cpu"]) == 0
    on_cpu = json.load(open(tmp_path / "m.json"))
    if torch.cuda.is_available():
        assert main(argv + ["train.device=cuda"]) == 0
        on_gpu = json.load(open(tmp_path / "m.json"))
        assert on_gpu["num_queries"] == on_cpu["num_queries"] == 2 and on_gpu["skipped_videos"] == []
    else:
        with pytest.raises(ValueError, match="train.device='cuda' but torch sees no GPU"):
            main(argv + ["train.device=cuda"])
