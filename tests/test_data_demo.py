"""The demo set: event semantics of the renderer, structure of the written set, determinism by seed."""

import filecmp
import json
import os

import numpy as np
import pytest

from lfvila_model.data import annotations as ann
from lfvila_model.data import demo_set as DM
from lfvila_model.data import video as V


def _event(colour, shape, kind, target=None):
    """Event id from its parts, by searching the vocabulary's sentences (independent of the id arithmetic)."""
    c, s = DM.COLOURS[colour][0], DM.SHAPES[shape]
    want = {"left": f"the {c} {s} moves to the left.", "right": f"the {c} {s} moves to the right.",
            "up": f"the {c} {s} moves up.", "down": f"the {c} {s} moves down.", "appear": f"a {c} {s} appears.",
            "grow": f"the {c} {s} grows bigger.",
            "turn": f"the {c} {s} turns {DM.COLOURS[target][0] if target is not None else ''}."}[kind]
    return [DM.event_sentence(e) for e in range(DM.num_events())].index(want)


def _object_pixels(frame, colour):
    rgb = np.array(DM.COLOURS[colour][1])
    return np.abs(frame.astype(int) - rgb).sum(-1) < 30


def test_vocabulary_is_198_distinct_sentences():
    sents = [DM.event_sentence(e) for e in range(DM.num_events())]
    assert DM.num_events() == 198 == len(set(sents))
    for sent in sents:  # each names one colour and one shape by word
        words = sent.rstrip(".").split()
        assert sum(c in words for c, _ in DM.COLOURS) >= 1 and sum(s in words for s in DM.SHAPES) == 1
    with pytest.raises(ValueError, match="event id"):
        DM.event_sentence(198)


@pytest.mark.parametrize("kind, axis, sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_motion_events_move_the_object(kind, axis, sign):
    clip = DM.render_clip(_event(2, 0, kind), 4, (64, 96), np.random.default_rng(0))
    assert clip.shape == (4, 64, 96, 3) and clip.dtype == np.uint8
    centres = [np.argwhere(_object_pixels(f, 2))[:, axis].mean() for f in clip]
    steps = np.diff(centres) * sign
    assert (steps > 3).all()  # monotone, several pixels per frame
    other = [np.argwhere(_object_pixels(f, 2))[:, 1 - axis].mean() for f in clip]
    assert np.ptp(other) < 1.0  # and only along that axis


def test_appear_grow_turn_events():
    rng = np.random.default_rng(1)
    appear = DM.render_clip(_event(0, 1, "appear"), 4, (64, 96), rng)
    counts = [_object_pixels(f, 0).sum() for f in appear]
    assert counts[0] == counts[1] == 0 and counts[2] == counts[3] > 50
    grow = DM.render_clip(_event(3, 2, "grow"), 4, (64, 96), rng)
    sizes = [_object_pixels(f, 3).sum() for f in grow]
    assert all(b > a for a, b in zip(sizes, sizes[1:])) and sizes[-1] > 2 * sizes[0]
    turn = DM.render_clip(_event(1, 0, "turn", target=4), 4, (64, 96), rng)
    assert _object_pixels(turn[0], 1).sum() > 50 and _object_pixels(turn[0], 4).sum() == 0
    assert _object_pixels(turn[3], 4).sum() > 50 and _object_pixels(turn[3], 1).sum() == 0


def test_object_stays_inside_the_eval_centre_crop():
    rng = np.random.default_rng(2)
    for e in range(0, DM.num_events(), 7):
        clip = DM.render_clip(e, 4, (64, 96), rng)
        colour = [c for c in range(6) if DM.event_sentence(e).split()[1] == DM.COLOURS[c][0]][0]
        ys, xs = np.nonzero(np.any([_object_pixels(f, colour) for f in clip], axis=0))
        assert ys.min() >= 0.05 * 64 and ys.max() < 0.95 * 64 and xs.min() >= 0.05 * 96 and xs.max() < 0.95 * 96


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    kw = dict(num_train=8, num_val=4, seed=3, frames_per_clip=4, size=(32, 48), progress=False)
    a = DM.make_demo_data(base / "a", workers=1, **kw)
    b = DM.make_demo_data(base / "b", workers=2, **kw)
    return base, a, b


def test_structure(two_sets):
    base, a, _ = two_sets
    train = ann.read_pretrain_jsonl(a["train"])
    val = ann.read_pretrain_jsonl(a["val"])
    ret = ann.read_retrieval_jsonl(a["val_retrieval"])
    assert len(train) == 8 and len(val) == 4 and len(ret) == 4
    vocab = {DM.event_sentence(e) for e in range(DM.num_events())}
    for split in (train, val):
        for s in split:
            assert len(s.clips) == 4 and len({c.text for c in s.clips}) == 4 and {c.text for c in s.clips} <= vocab
            vid = s.clips[0].clip_id.split(".")[0]
            assert [c.clip_id for c in s.clips] == [f"{vid}.{m}.mp4" for m in range(4)]
            for c in s.clips:
                assert V.count_frames(ann.clip_video_path(a["clip_root"], c.clip_id)) == 4
        # videos 2k and 2k+1: the same event set in two different orders
        for k in range(0, len(split), 2):
            p, q = [c.text for c in split[k].clips], [c.text for c in split[k + 1].clips]
            assert sorted(p) == sorted(q) and p != q
    sets = lambda split: {frozenset(c.text for c in s.clips) for s in split}  # noqa: E731
    assert not sets(train) & sets(val)  # no validation event set is seen in training
    assert len(sets(train)) == 4 and len(sets(val)) == 2
    for s, r in zip(val, ret):
        assert r.clip_id == s.clips[0].clip_id.split(".")[0] and list(r.sentences) == [c.text for c in s.clips]
        whole = V.decode_all_frames(ann.retrieval_video_path(a["video_root"], r.clip_id))
        parts = np.concatenate([V.decode_all_frames(ann.clip_video_path(a["clip_root"], c.clip_id))
                                for c in s.clips])
        assert whole.shape == (16, 32, 48, 3)
        # the whole video and its 4 clip files show the same frames (up to codec error)
        assert np.abs(whole.astype(int) - parts.astype(int)).mean() < 3
    meta = json.load(open(os.path.join(a["out_dir"], "meta.json")))
    assert meta["summary"]["num_train"] == 8 and len(meta["vocabulary"]) == 198


def test_deterministic_by_seed_and_worker_count(two_sets, tmp_path):
    base, a, b = two_sets
    for name in ("train.jsonl", "val.jsonl", "val_retrieval.jsonl"):
        assert (base / "a" / name).read_bytes() == (base / "b" / name).read_bytes()
    files = sorted(os.path.relpath(os.path.join(d, f), base / "a")
                   for d, _, fs in os.walk(base / "a") for f in fs if f.endswith(".mp4"))
    assert len(files) == 12 * 4 + 4
    for f in files:
        fa, fb = V.decode_all_frames(base / "a" / f), V.decode_all_frames(base / "b" / f)
        assert np.array_equal(fa, fb)
        assert filecmp.cmp(base / "a" / f, base / "b" / f, shallow=False)  # even the mp4 bytes
    c = DM.make_demo_data(tmp_path / "c", num_train=8, num_val=4, seed=4, frames_per_clip=4, size=(32, 48),
                          workers=1, progress=False)
    assert open(c["train"], "rb").read() != (base / "a" / "train.jsonl").read_bytes()


def test_existing_set_is_reused_unless_forced(two_sets):
    base, a, _ = two_sets
    before = os.stat(a["train"]).st_mtime_ns
    again = DM.make_demo_data(base / "a", num_train=8, num_val=4, seed=3, frames_per_clip=4, size=(32, 48),
                              workers=1, progress=False)
    assert again == a and os.stat(a["train"]).st_mtime_ns == before


def test_temporal_order_candidates(two_sets):
    _, a, _ = two_sets
    cands = DM.temporal_order_candidates(a["val"])
    assert cands == DM.temporal_order_candidates(a["val_retrieval"])
    true = [c.text for c in ann.read_pretrain_jsonl(a["val"])[1].clips]
    c1 = cands[1]
    assert c1["true_index"] == 0 and c1["candidates"][0] == true and len(c1["candidates"]) == 24
    assert len({tuple(p) for p in c1["candidates"]}) == 24 and all(sorted(p) == sorted(true)
                                                                   for p in c1["candidates"])
    # the other rendered order of the same set is one of the candidates
    other = [c.text for c in ann.read_pretrain_jsonl(a["val"])[0].clips]
    assert other in c1["candidates"][1:]
    assert DM.temporal_order_candidates([["a", "b"]])[0]["candidates"] == [["a", "b"], ["b", "a"]]
    with pytest.raises(ValueError, match="repeats a sentence"):
        DM.temporal_order_candidates([["a", "a"]])


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="num_train must be even"):
        DM.make_demo_data(tmp_path, num_train=7, num_val=2)
    with pytest.raises(ValueError, match="size must be"):
        DM.make_demo_data(tmp_path, num_train=2, num_val=2, size=(33, 48))
    with pytest.raises(ValueError, match="codec must be"):
        DM.make_demo_data(tmp_path, num_train=2, num_val=2, codec="vp9")
