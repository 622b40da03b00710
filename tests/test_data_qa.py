"""QA and classification fine-tuning datasets on mp4 files made here: sampled frames, the text in each sentence
slot, labels, How2QA span labels worked out by hand, collation, and skip-and-count of bad videos."""

import json
import logging

import numpy as np
import pytest
import torch

from lfvila_model.data import annotations as ann
from lfvila_model.data import datasets as D
from lfvila_model.data import qa as Q
from lfvila_model.data import text as T
from lfvila_model.data import video as V

H, W = 32, 48
MEAN0, STD0 = 0.485, 0.229
L = 10  # tokens per sentence in these tests


pytestmark = pytest.mark.usefixtures("one_thread")


def level(i):
    """Grey level of frame i of the test videos (far apart, so a decoded frame tells its index)."""
    return 10 + 20 * i


def write_grey_video(path, n=10, fps=2):
    V.write_video(path, np.concatenate([np.full((1, H, W, 3), level(i), np.uint8) for i in range(n)]), fps=fps,
                  codec="mpeg4")


def frame_indices(video):
    """(3, F, H, W) normalised -> the source frame index of each sampled frame (from its grey level)."""
    red = (video[0].mean(dim=(1, 2)).numpy() * STD0 + MEAN0) * 255
    idx = np.round((red - 10) / 20).astype(int)
    assert np.abs(red - level(idx)).max() < 3  # every frame is one source frame, not a blend
    return idx.tolist()


@pytest.fixture(scope="module")
def one_row():
    return T.ParagraphTokenizer(num_sentences=1, max_length=L)


def row(tok1, sentence):
    """The (L,) token ids / mask of one sentence, tokenised alone."""
    e = tok1([sentence])
    return e["input_ids"][0], e["attention_mask"][0]


def assert_rows(ids, mask, tok1, sentences, num_rows):
    """Rows 0..len-1 hold `sentences` in order; the rest are all-[PAD] with a zero mask."""
    for m, s in enumerate(sentences):
        want_ids, want_mask = row(tok1, s)
        assert torch.equal(ids[m], want_ids), (m, s)
        assert torch.equal(mask[m], want_mask), (m, s)
    pad = tok1.pad_token_id
    for m in range(len(sentences), num_rows):
        assert (ids[m] == pad).all() and (mask[m] == 0).all(), m


# -- How2QA ----------------------------------------------------------------------------------------------------------


def how2qa_record(clip_id, n_subs=8, span=(1.0, 3.0), answer_idx=2):
    subs = [ann.Subtitle(f"subtitle {j} of {clip_id}", float(j), float(j) + 1) for j in range(n_subs)]
    return ann.How2QARecord(clip_id, span, f"what happens in {clip_id}?",
                            tuple(f"answer {k} for {clip_id}" for k in range(4)), tuple(subs), answer_idx)


@pytest.fixture(scope="module")
def how2qa_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("how2qa")
    write_grey_video(root / "a.mp4", n=10, fps=2)
    write_grey_video(root / "b.mp4", n=10, fps=2)
    return root


@pytest.fixture(scope="module")
def tok8():
    return T.ParagraphTokenizer(num_sentences=8, max_length=L)


def test_span_frame_labels_by_hand():
    # frames 0, 2, 4, 6, 9 at 2 fps lie at 0, 1, 2, 3, 4.5 s; both span ends are inclusive
    assert Q.span_frame_labels([0, 2, 4, 6, 9], 2.0, (1.0, 3.0)).tolist() == [0, 1, 1, 1, 0]
    # the same frames at 3 fps: 0, 0.667, 1.333, 2, 3 s
    assert Q.span_frame_labels([0, 2, 4, 6, 9], 3.0, (1.0, 3.0)).tolist() == [0, 0, 1, 1, 1]
    assert Q.span_frame_labels([0, 1], 1.0, (5.0, 6.0)).dtype == torch.int64
    with pytest.raises(ValueError, match="fps must be a positive number, got 0"):
        Q.span_frame_labels([0], 0, (0.0, 1.0))


def test_how2qa_item_tokens_label_and_span_from_video_fps(how2qa_root, tok8, one_row):
    recs = [how2qa_record("a", n_subs=8, answer_idx=2), how2qa_record("b", n_subs=3, answer_idx=0)]
    ds = Q.How2QADataset(recs, how2qa_root, tok8, num_frames=5, size=(H, W), train=False)
    item = ds[0]
    assert item["video"].shape == (3, 5, H, W) and item["video_id"] == "a"
    # eval sampling: linspace(0, 9, 5) = 0, 2.25, 4.5, 6.75, 9 -> frames 0, 2, 4, 6, 9
    assert frame_indices(item["video"]) == [0, 2, 4, 6, 9]
    assert item["label"] == 2 and item["fps"] == 2.0
    # the video says 2 fps: frames at 0, 1, 2, 3, 4.5 s, span [1, 3] s
    assert item["span_labels"].tolist() == [0, 1, 1, 1, 0]
    assert item["input_ids"].shape == (4, 8, L) and item["attention_mask"].shape == (4, 8, L)
    for k in range(4):  # [question, answer k, subtitles 0..5]: the first 6 of the 8 subtitles
        assert_rows(item["input_ids"][k], item["attention_mask"][k], one_row,
                    ["what happens in a?", f"answer {k} for a"] + [f"subtitle {j} of a" for j in range(6)], 8)
    assert item["num_sentences"] == [8, 8, 8, 8]
    short = ds[1]  # 3 subtitles: rows 5..7 are padding
    for k in range(4):
        assert_rows(short["input_ids"][k], short["attention_mask"][k], one_row,
                    ["what happens in b?", f"answer {k} for b"] + [f"subtitle {j} of b" for j in range(3)], 8)
    assert short["num_sentences"] == [5, 5, 5, 5] and short["label"] == 0

    b = D.collate([item, short])
    assert b["input_ids"].shape == (2, 4, 8, L) and b["attention_mask"].shape == (2, 4, 8, L)
    assert b["labels"].tolist() == [2, 0] and b["labels"].dtype == torch.long
    assert b["span_labels"].tolist() == [[0, 1, 1, 1, 0]] * 2 and b["span_labels"].dtype == torch.long
    assert b["num_sentences"].tolist() == [[8] * 4, [5] * 4]
    assert torch.equal(b["input_ids"][1], short["input_ids"])


def test_how2qa_fixed_fps_and_header_fallback(how2qa_root, tok8, monkeypatch):
    recs = [how2qa_record("a")]
    fixed = Q.How2QADataset(recs, how2qa_root, tok8, num_frames=5, fps=3, size=(H, W), train=False)[0]
    # official assumption (3 fps): frames 0, 2, 4, 6, 9 at 0, 0.667, 1.333, 2, 3 s
    assert fixed["fps"] == 3.0 and fixed["span_labels"].tolist() == [0, 0, 1, 1, 1]
    monkeypatch.setattr(Q, "video_fps", lambda path: None)  # a header without a frame rate
    fallback = Q.How2QADataset(recs, how2qa_root, tok8, num_frames=5, size=(H, W), train=False)[0]
    assert fallback["fps"] == Q.HOW2QA_DEFAULT_FPS == 3.0
    assert fallback["span_labels"].tolist() == [0, 0, 1, 1, 1]


def test_how2qa_reads_each_header_once(how2qa_root, tok8, monkeypatch):
    calls = []
    real = Q.video_fps
    monkeypatch.setattr(Q, "video_fps", lambda path: calls.append(path) or real(path))
    ds = Q.How2QADataset([how2qa_record("a")], how2qa_root, tok8, num_frames=5, size=(H, W), train=False)
    first, second = ds[0], ds[0]
    assert len(calls) == 1 and first["fps"] == second["fps"] == real(calls[0])
    assert first["span_labels"].tolist() == second["span_labels"].tolist()


def test_how2qa_train_span_labels_follow_the_jittered_frames(how2qa_root, tok8):
    ds = Q.How2QADataset([how2qa_record("a", span=(1.5, 3.0))], how2qa_root, tok8, num_frames=5, size=(H, W),
                         train=True, seed=3)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        idx = frame_indices(item["video"])
        seen.add(tuple(idx))
        # frame i lies at i / 2 s; inside [1.5, 3] means i in {3, 4, 5, 6}
        assert item["span_labels"].tolist() == [int(3 <= i <= 6) for i in idx]
    assert len(seen) > 1  # the ends were jittered (interval = 10 // 4 = 2)


def test_how2qa_without_tokenizer_and_argument_checks(how2qa_root, tok8):
    ds = Q.How2QADataset([how2qa_record("a", n_subs=1)], how2qa_root, None, num_frames=2, size=(H, W))
    assert ds[0]["sentences"][3] == ["what happens in a?", "answer 3 for a", "subtitle 0 of a"]
    with pytest.raises(ValueError, match=r"tokenizer.num_sentences must be 2 \+ max_subtitles = 6"):
        Q.How2QADataset([how2qa_record("a")], how2qa_root, tok8, max_subtitles=4)
    three = ann.How2QARecord("a", (0.0, 1.0), "q", ("x", "y", "z"), (), 0)
    with pytest.raises(ValueError, match=r"record 0 \('a'\) has 3 answers; every record needs num_choices=4"):
        Q.How2QADataset([three], how2qa_root, tok8)
    with pytest.raises(ValueError, match=r"record 0 \('a'\): span \[3.0, 1.0\]"):
        Q.How2QADataset([how2qa_record("a", span=(3.0, 1.0))], how2qa_root, tok8)
    with pytest.raises(ValueError, match="fps must be a positive number or None"):
        Q.How2QADataset([how2qa_record("a")], how2qa_root, tok8, fps=-1)
    with pytest.raises(TypeError, match=r"records\[0\] must be a How2QARecord, got ViolinRecord"):
        Q.How2QADataset([ann.ViolinRecord("a", "s", (), 1)], how2qa_root, tok8)


def test_how2qa_bad_videos_skipped_logged_and_counted(tmp_path, tok8, caplog):
    write_grey_video(tmp_path / "good.mp4", n=6)
    write_grey_video(tmp_path / "cut.mp4", n=6)
    data = (tmp_path / "cut.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    recs = [how2qa_record(c) for c in ("good", "missing", "cut")]
    ds = Q.How2QADataset(recs, tmp_path, tok8, num_frames=4, size=(16, 16), train=True)
    with caplog.at_level(logging.WARNING, logger="lfvila.data"):
        items = [ds[i] for i in range(3)]
    assert [bool(it.get("skipped")) for it in items] == [False, True, True]
    assert "missing.mp4" in caplog.text and "cut.mp4" in caplog.text
    b = D.collate(items)
    assert b["size"] == 1 and b["labels"].tolist() == [2] and b["span_labels"].shape == (1, 4)
    tracker = D.SkipTracker(len(ds), max_skip_fraction=1.0)
    tracker.update(b)
    assert tracker.count == 2 and sorted(ds.skipped) == [1, 2]
    assert [p.rsplit("/", 1)[1] for p in tracker.summary()["paths"]] == ["cut.mp4", "missing.mp4"]


# -- VIOLIN, ActivityNet-QA, classification ---------------------------------------------------------------------------


def test_violin_statement_first_four_subtitles_and_label(tmp_path, one_row):
    write_grey_video(tmp_path / "v.mp4", n=7)
    subs = [{"text": f"line {j}", "start": j, "end": j + 1} for j in range(6)]
    (tmp_path / "violin.jsonl").write_text(
        json.dumps({"clip_id": "v", "text_q": "a man opens a door.", "text_s": subs, "answer": 1}) + "\n"
        + json.dumps({"clip_id": "gone", "text_q": "nothing.", "text_s": subs[:1], "answer": 0}) + "\n")
    tok5 = T.ParagraphTokenizer(num_sentences=5, max_length=L)
    ds = Q.ViolinDataset(tmp_path / "violin.jsonl", tmp_path, tok5, num_frames=4, num_labels=2, size=(H, W))
    item = ds[0]
    # linspace(0, 6, 4) = 0, 2, 4, 6
    assert frame_indices(item["video"]) == [0, 2, 4, 6]
    assert item["label"] == 1 and item["input_ids"].shape == (5, L) and item["num_sentences"] == 5
    assert_rows(item["input_ids"], item["attention_mask"], one_row,
                ["a man opens a door.", "line 0", "line 1", "line 2", "line 3"], 5)
    gone = ds[1]
    assert gone["skipped"] and gone["path"].endswith("gone.mp4") and gone["reason"] == "file not found"
    b = D.collate([item, gone])
    assert b["size"] == 1 and b["labels"].tolist() == [1] and b["input_ids"].shape == (1, 5, L)
    assert b["skipped"][0]["index"] == 1 and "span_labels" not in b
    with pytest.raises(ValueError, match=r"tokenizer.num_sentences must be 1 \+ max_subtitles = 5"):
        Q.ViolinDataset(tmp_path / "violin.jsonl", tmp_path, one_row)
    with pytest.raises(ValueError, match=r"record 0 \('v'\): answer 1 is outside \[0, num_labels=1\)"):
        Q.ViolinDataset(tmp_path / "violin.jsonl", tmp_path, tok5, num_labels=1)


def test_activitynet_qa_question_and_class_label(tmp_path, one_row):
    write_grey_video(tmp_path / "v_xyz.mp4", n=5)
    recs = [ann.ActivityNetQARecord("v_xyz", "what is the man holding?", 7)]
    ds = Q.ActivityNetQADataset(recs, tmp_path, one_row, num_frames=3, num_labels=10, size=(H, W))
    item = ds[0]
    assert frame_indices(item["video"]) == [0, 2, 4]  # linspace(0, 4, 3)
    assert item["label"] == 7 and item["video_id"] == "v_xyz" and item["input_ids"].shape == (1, L)
    assert_rows(item["input_ids"], item["attention_mask"], one_row, ["what is the man holding?"], 1)
    b = D.collate([item, item])
    assert b["labels"].tolist() == [7, 7] and b["input_ids"].shape == (2, 1, L)
    with pytest.raises(ValueError, match=r"record 0 \('v_xyz'\): answer 7 is outside \[0, num_labels=5\)"):
        Q.ActivityNetQADataset(recs, tmp_path, one_row, num_labels=5)


def test_video_classification_label_key_and_no_text(tmp_path):
    write_grey_video(tmp_path / "c1.mp4", n=4)
    (tmp_path / "lvu.jsonl").write_text(json.dumps({"vid": "c1", "scene": 3}) + "\n"
                                        + json.dumps({"vid": "c2", "scene": 1}) + "\n")
    ds = Q.VideoClassificationDataset(tmp_path / "lvu.jsonl", tmp_path, label_key="scene", id_key="vid",
                                      num_frames=4, num_labels=6, size=(H, W))
    item = ds[0]
    assert frame_indices(item["video"]) == [0, 1, 2, 3] and item["label"] == 3
    assert not any(k in item for k in ("input_ids", "sentences", "span_labels"))
    missing = ds[1]
    assert missing["skipped"] and missing["path"].endswith("c2.mp4")
    b = D.collate([item, missing])
    assert set(b) == {"size", "skipped", "video", "index", "video_id", "labels"}
    assert b["labels"].tolist() == [3] and b["video"].shape == (1, 3, 4, H, W)
    with pytest.raises(ValueError, match=r"record 0 \('c1'\): label 3 is outside \[0, num_labels=3\)"):
        Q.VideoClassificationDataset(tmp_path / "lvu.jsonl", tmp_path, label_key="scene", id_key="vid",
                                     num_labels=3)
    # COIN's keys are the defaults
    coin = [ann.ClassificationRecord("c1", 179)]
    assert Q.VideoClassificationDataset(coin, tmp_path, num_frames=2, size=(H, W))[0]["label"] == 179


def test_preload_fills_the_cache_of_a_qa_dataset(tmp_path):
    write_grey_video(tmp_path / "c1.mp4", n=4)
    ds = Q.VideoClassificationDataset([ann.ClassificationRecord("c1", 0), ann.ClassificationRecord("c9", 1)],
                                      tmp_path, num_frames=2, size=(H, W), cache=V.FrameCache("memory"))
    assert [p.rsplit("/", 1)[1] for p in D.preload_videos(ds, progress=False)] == ["c9.mp4"]
    assert frame_indices(ds[0]["video"]) == [0, 3] and ds.cache.hits == 1
