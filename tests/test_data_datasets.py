"""Pre-training and retrieval datasets on mp4 files made here: frames, window/text alignment, skip-and-count."""

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lfvila_model.data import annotations as ann
from lfvila_model.data import datasets as D
from lfvila_model.data import text as T
from lfvila_model.data import video as V

H, W = 32, 48
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def grey(level, t=1):
    return np.full((t, H, W, 3), level, np.uint8)


def clip_level(m, j):
    """Grey level of frame j of clip m (distinct everywhere, far apart)."""
    return 20 + 40 * m + 5 * j


def unnormalised_levels(video):
    """(3, T, H, W) normalised -> per-frame mean grey level in 0..255 (red channel)."""
    red = video[0].mean(dim=(1, 2)).numpy()
    return (red * STD[0] + MEAN[0]) * 255


@pytest.fixture(scope="module")
def tok():
    return T.ParagraphTokenizer(num_sentences=4, max_length=12)


@pytest.fixture(scope="module")
def pre_root(tmp_path_factory):
    """One video 'vid' of 5 clips, 6 frames each (solid grey levels), plus its annotation."""
    root = tmp_path_factory.mktemp("pre")
    clips = []
    for m in range(5):
        cid = f"vid.{m}.mp4"
        fr = np.concatenate([grey(clip_level(m, j)) for j in range(6)])
        (root / "vid").mkdir(exist_ok=True)
        V.write_video(ann.clip_video_path(root, cid), fr, codec="mpeg4")
        clips.append(ann.ClipText(cid, f"sentence number {m}"))
    return root, ann.PretrainSample(tuple(clips))


def test_pretrain_eval_frames_are_segment_starts_of_clips_0_to_3(pre_root, tok):
    root, sample = pre_root
    ds = D.PretrainDataset([sample], root, tok, num_clips=4, frames_per_clip=2, size=(H, W), train=False)
    item = ds[0]
    assert item["video"].shape == (3, 8, H, W) and item["video_id"] == "vid"
    # segment starts of 6 frames into 2: linspace(0, 6, 3)[:2] = 0, 3
    want = [clip_level(m, j) for m in range(4) for j in (0, 3)]
    assert np.abs(unnormalised_levels(item["video"]) - want).max() < 3
    assert torch.equal(item["input_ids"], tok([f"sentence number {m}" for m in range(4)])["input_ids"])


def test_pretrain_train_window_keeps_clip_sentence_alignment(pre_root, tok):
    root, sample = pre_root
    ds = D.PretrainDataset([sample], root, tok, num_clips=4, frames_per_clip=2, size=(H, W), train=True, seed=5)
    starts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        levels = unnormalised_levels(item["video"])
        w0 = int(round((levels[0] - 20) / 40))  # which clip the first frame came from
        starts.add(w0)
        assert np.abs(levels - [clip_level(w0 + m, j) for m in range(4) for j in (0, 3)]).max() < 3
        # sentence m is the text of clip w0 + m: the temporal correspondence MTC relies on
        want = tok([f"sentence number {w0 + m}" for m in range(4)])["input_ids"]
        assert torch.equal(item["input_ids"], want)
    assert starts == {0, 1}


def test_items_depend_only_on_seed_epoch_index(pre_root, tok):
    root, sample = pre_root
    mk = lambda seed: D.PretrainDataset([sample] * 2, root, tok, num_clips=4, frames_per_clip=2,  # noqa: E731
                                        size=(24, 24), train=True, seed=seed)
    a, b = mk(1), mk(1)
    b[1]  # touching another item first must not change item 0
    assert torch.equal(a[0]["video"], b[0]["video"])
    diffs = []
    for e in range(1, 6):
        b.set_epoch(e)
        diffs.append(not torch.equal(a[0]["video"], b[0]["video"]))
    assert any(diffs)
    with pytest.raises(ValueError, match="epoch must be"):
        a.set_epoch(-1)


def test_retrieval_eval_linspace_frames(tmp_path, tok):
    fr = np.concatenate([grey(10 + 10 * i) for i in range(20)])
    V.write_video(tmp_path / "v1.mp4", fr, codec="mpeg4")
    (tmp_path / "r.jsonl").write_text(json.dumps({"clip_id": "v1", "text": ["one.", "two.", "three."]}) + "\n")
    ds = D.RetrievalDataset(tmp_path / "r.jsonl", tmp_path, tok, num_frames=5, size=(H, W), train=False)
    item = ds[0]
    assert item["video"].shape == (3, 5, H, W)
    # linspace(0, 19, 5) = 0, 4.75, 9.5, 14.25, 19 -> frames 0, 4, 9, 14, 19
    assert np.abs(unnormalised_levels(item["video"]) - [10, 50, 100, 150, 200]).max() < 3
    assert item["num_sentences"] == 3 and (item["attention_mask"][3] == 0).all()
    cached = D.RetrievalDataset(tmp_path / "r.jsonl", tmp_path, tok, num_frames=5, size=(H, W), train=False,
                                cache=V.FrameCache("memory"))
    assert torch.equal(cached[0]["video"], item["video"])


@pytest.fixture
def flaky_set(tmp_path, tok):
    """4 retrieval videos: 2 good, 1 missing, 1 truncated."""
    for i in (0, 1, 3):
        V.write_video(tmp_path / f"v{i}.mp4", grey(100, 4), codec="mpeg4")
    data = (tmp_path / "v3.mp4").read_bytes()
    (tmp_path / "v3.mp4").write_bytes(data[: len(data) // 2])
    recs = [ann.RetrievalRecord(f"v{i}", (f"video {i}.",)) for i in range(4)]
    return D.RetrievalDataset(recs, tmp_path, tok, num_frames=4, size=(16, 16), train=True)


def test_bad_videos_are_skipped_logged_and_counted(flaky_set, caplog):
    with caplog.at_level(logging.WARNING, logger="lfvila.data"):
        loader = DataLoader(flaky_set, batch_size=2, collate_fn=D.collate, num_workers=0)
        tracker = D.SkipTracker(len(flaky_set), max_skip_fraction=0.5)
        sizes = []
        for batch in loader:
            tracker.update(batch)
            sizes.append(batch["size"])
            if batch["size"]:
                assert batch["video"].shape == (batch["size"], 3, 4, 16, 16)
                assert batch["input_ids"].shape == (batch["size"], 4, 12)
    assert sizes == [2, 0]
    assert tracker.count == 2 and tracker.fraction == 0.5  # 2 of 4: at the bound, not past it
    assert sorted(tracker.summary()["paths"]) == sorted([str(flaky_set.clip_paths(2)[0]),
                                                         str(flaky_set.clip_paths(3)[0])])
    assert "v2.mp4" in caplog.text and "v3.mp4" in caplog.text
    # a second epoch over the same bad files does not count them twice
    for batch in loader:
        tracker.update(batch)
    assert tracker.count == 2


def test_skip_bound_stops_the_run(flaky_set):
    loader = DataLoader(flaky_set, batch_size=1, collate_fn=D.collate)
    tracker = D.SkipTracker(len(flaky_set), max_skip_fraction=0.25)
    seen = 0
    with pytest.raises(D.TooManySkippedError, match=r"2 of 4 items \(50.00%\).*max_skip_fraction=0.25"):
        for batch in loader:
            seen += 1
            tracker.update(batch)
    assert seen == 4  # stopped at the second bad video (item 3), not at the first


def test_skip_tracker_counts_with_worker_processes(flaky_set):
    loader = DataLoader(flaky_set, batch_size=2, collate_fn=D.collate, num_workers=2)
    tracker = D.SkipTracker(len(flaky_set), max_skip_fraction=1.0)
    for batch in loader:
        tracker.update(batch)
    assert tracker.count == 2


def test_preload_reports_bad_videos(flaky_set):
    flaky_set.cache = V.FrameCache("memory")
    bad = D.preload_videos(flaky_set, progress=False)
    assert [p.rsplit("/", 1)[1] for p in bad] == ["v2.mp4", "v3.mp4"]
    assert len(flaky_set.cache) == 2


def test_dataset_argument_checks(pre_root, tok):
    root, sample = pre_root
    with pytest.raises(ValueError, match="tokenizer.num_sentences must equal num_clips=2"):
        D.PretrainDataset([sample], root, tok, num_clips=2)
    with pytest.raises(ValueError, match="fewer than num_clips=6"):
        D.PretrainDataset([sample], root, None, num_clips=6)
    with pytest.raises(ValueError, match="size must be"):
        D.PretrainDataset([sample], root, None, size=(0, 3))
    with pytest.raises(ValueError, match="max_skip_fraction must be"):
        D.SkipTracker(4, 1.5)
    item = D.PretrainDataset([sample], root, None, frames_per_clip=1, size=(16, 16), train=False)[0]
    assert item["sentences"] == [f"sentence number {m}" for m in range(4)]
