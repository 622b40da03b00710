"""The pre-training pipeline end to end, as a user runs it (issue 16): raw videos + HD-VILA META/TEXT ->
`lfvila prepare clips` -> `lfvila shard` -> `lfvila pretrain` with ``data.kind: shards``.

The test encodes its own "YouTube" videos with PyAV (64x48, 10 fps, a keyframe every 10 frames, frame i a flat
colour that changes with i) and writes META and TEXT in the public HD-VILA-100M format. Then, through the CLI entry
point and nothing else, the commands of docs/pretraining-at-scale.md::

    lfvila prepare clips --meta META.jsonl --transcripts TEXT.jsonl --videos RAW --out PREP --workers 1
    lfvila shard --annotations PREP/pretrain.jsonl --videos PREP/clips --out SHARDS --samples-per-shard 1
    lfvila pretrain --config run.yaml      # data.kind: shards, data.train: SHARDS

and checks: a checkpoint is written and the losses are finite; and the items the shard reader yields equal those
``PretrainDataset`` makes from the clip folder and ``pretrain.jsonl`` for the same samples, tensor for tensor (same
seed and epoch), so writer and reader agree on the format, including the sample numbers when the writer skips a
sample whose clip file is gone."""

from __future__ import annotations

import json
import math
import os
import shutil

import av
import numpy as np
import pytest
import torch

from lfvila_model.cli import main
from lfvila_model.data.annotations import clip_video_path, read_pretrain_jsonl
from lfvila_model.data.datasets import PretrainDataset
from lfvila_model.data.shard_stream import ShardStream, read_shard_index
from lfvila_model.data.text import ParagraphTokenizer
from tests.helpers import BERT_VOCAB, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

FPS = 10
WORDS = "she folds the dough twice then cuts it into strips and fries them until golden brown".split()


def make_video(path, seconds, seed):
    """An h264 mp4 of ``seconds`` at 10 fps, 64x48; frame i a flat colour drawn from (seed, i)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"preset": "ultrafast", "threads": "1", "x264-params": "keyint=10:min-keyint=10"}
        for _ in range(int(round(seconds * FPS))):
            colour = rng.integers(16, 240, 3).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(colour, (48, 64, 3)).copy(), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def stamp(seconds):
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:06.3f}"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def youtube(tmp_path_factory):
    """Raw videos, META and TEXT. ``vidA``: 6 clips of 1 s, all with text (one sample of 6 clips). ``vidB``: 9
    clips, clip 4 without text (two samples of 4). ``vidC``: in META but not downloaded (reported, not fatal)."""
    root = tmp_path_factory.mktemp("youtube")
    raw = root / "raw"
    raw.mkdir()
    make_video(raw / "vidA.mp4", 6.5, seed=1)
    make_video(raw / "vidB.mp4", 9.5, seed=2)
    meta, text = [], []
    rng = np.random.default_rng(0)
    for vid, n in (("vidA", 6), ("vidB", 9), ("vidC", 4)):
        clips = [{"clip_id": f"{vid}.{k}.mp4", "span": [stamp(k + 0.25), stamp(k + 1.25)]} for k in range(n)]
        meta.append({"video_id": vid, "url": f"https://www.youtube.com/watch?v={vid}", "clip": clips})
        text += [{"clip_id": c["clip_id"], "text": " ".join(rng.choice(WORDS, 6))} for c in clips
                 if c["clip_id"] != "vidB.4.mp4"]
    return {"raw": str(raw), "meta": write_jsonl(root / "hdvila_meta.jsonl", meta),
            "text": write_jsonl(root / "hdvila_text.jsonl", text), "root": root}


def _run_config(shards, out, mc):
    changes = {"video": mc.video.to_dict(), "text": mc.text.to_dict(), "max_sentence_len": mc.max_sentence_len,
               "proj_dim": mc.proj_dim, "pool_kernel": list(mc.pool_kernel)}
    return {"model": {"preset": "lfvila-tiny", "changes": json.loads(json.dumps(changes))},
            "data": {"kind": "shards", "train": shards, "num_workers": 0, "seed": 1, "shuffle_buffer": 2},
            "train": {"out_dir": out, "max_steps": 2, "batch_size": 1, "lr": 1e-3, "warmup_steps": 0,
                      "seed": 4, "device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False,
                      "log_every": 1, "ckpt_every": 1}}


def test_raw_videos_to_clips_to_shards_to_pretraining(youtube, tmp_path, capsys):
    import yaml

    prep, shards, out = str(tmp_path / "prep"), str(tmp_path / "shards"), str(tmp_path / "run")

    # 1. raw videos + META + TEXT -> clips + pretrain.jsonl
    assert main(["prepare", "clips", "--meta", youtube["meta"], "--transcripts", youtube["text"],
                 "--videos", youtube["raw"], "--out", prep, "--workers", "1", "--no-progress"]) == 0
    jsonl = os.path.join(prep, "pretrain.jsonl")
    samples = read_pretrain_jsonl(jsonl)
    assert [[c.clip_id for c in s.clips] for s in samples] == [
        [f"vidA.{k}.mp4" for k in range(6)], [f"vidB.{k}.mp4" for k in range(4)],
        [f"vidB.{k}.mp4" for k in range(5, 9)]]
    with open(os.path.join(prep, "report.json")) as f:
        assert json.load(f)["missing_videos"] == ["vidC"]  # reported, not fatal
    clips = os.path.join(prep, "clips")
    with av.open(clip_video_path(clips, "vidA.0.mp4")) as c:  # cut at 3 fps: 1 s -> 3 frames
        assert c.streams.video[0].frames == 3 and math.isclose(float(c.streams.video[0].average_rate), 3.0)

    # a clip lost between the two steps: `lfvila shard` skips its sample, the others keep their numbers
    os.remove(clip_video_path(clips, "vidB.2.mp4"))

    # 2. clips + pretrain.jsonl -> shards + index.json
    assert main(["shard", "--annotations", jsonl, "--videos", clips, "--out", shards, "--samples-per-shard", "1",
                 "--no-progress"]) == 0
    index = read_shard_index(shards)
    assert index.total == 2 and index.counts == [1, 1]
    with open(os.path.join(shards, "index.json")) as f:
        assert json.load(f)["skipped"] == 1

    # the reader's items are PretrainDataset's for the same samples (same numbers, seed and epoch)
    mc = tiny_config(text={"vocab_size": BERT_VOCAB})  # the real (BERT uncased) tokenizer's ids
    tok = ParagraphTokenizer(num_sentences=mc.num_sentences, max_length=mc.max_sentence_len)
    geometry = dict(num_clips=mc.num_clips, frames_per_clip=mc.video.num_frames // mc.num_clips,
                    size=tuple(mc.video.input_size), seed=5)
    stream = ShardStream(shards, tok, shuffle_buffer=0, **geometry)
    ds = PretrainDataset(jsonl, clips, tok, train=True, **geometry)
    for epoch in (0, 1):
        stream.items.set_epoch(epoch)
        ds.set_epoch(epoch)
        raw = stream.raw_samples(epoch, 0, 1)
        got = [stream.item(next(raw)) for _ in range(2)]
        assert sorted(g["index"] for g in got) == [0, 2]  # line 2 (vidB.0-3) was skipped by the writer
        for g in got:
            assert not g.get("skipped"), g
            want = ds[g["index"]]
            assert g.keys() == want.keys()
            for k, v in want.items():
                if torch.is_tensor(v):
                    assert torch.equal(g[k], v), (g["index"], k)
                else:
                    assert g[k] == v, (g["index"], k)

    # 3. shards -> pre-training (data.kind: shards), 2 steps
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_run_config(shards, out, mc)))
    capsys.readouterr()
    assert main(["pretrain", "--config", str(cfg_path)]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [r for r in map(json.loads, f) if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in losses)
    ckpt = os.path.join(out, "checkpoints", "step-00000002")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.pt"))
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors"))


def test_shard_says_so_when_no_sample_is_left(youtube, tmp_path, capsys):
    prep = str(tmp_path / "prep")
    assert main(["prepare", "clips", "--meta", youtube["meta"], "--transcripts", youtube["text"],
                 "--videos", youtube["raw"], "--out", prep, "--workers", "1", "--no-progress"]) == 0
    shutil.rmtree(os.path.join(prep, "clips"))  # the clips are gone: every sample is skipped
    with pytest.raises(SystemExit) as e:
        main(["shard", "--annotations", os.path.join(prep, "pretrain.jsonl"), "--videos", prep, "--out",
              str(tmp_path / "shards"), "--no-progress"])
    assert "no sample written (3 of 3 skipped" in str(e.value.code) and "report.json" in str(e.value.code)


@pytest.mark.parametrize("cmd, reads, writes, then", [
    (["prepare", "clips"], ["--meta", "--transcripts", "--videos"], ["OUT/clips/", "OUT/pretrain.jsonl"],
     "Then: lfvila shard --annotations OUT/pretrain.jsonl --videos OUT/clips"),
    (["shard"], ["pretrain.jsonl", "CLIPS_DIR", "`lfvila prepare clips`"], ["SHARDS_DIR/index.json"],
     "Then: lfvila pretrain --config configs/train_stage1.yaml --set data.kind=shards --set data.train=SHARDS_DIR"),
    (["pretrain"], ["data.kind=shards the shard folder of `lfvila shard`", "OUT/pretrain.jsonl"],
     ["checkpoints/", "metrics.jsonl"], "Then: `lfvila evaluate --checkpoint RUN_DIR`"),
])
def test_help_tells_the_pipeline(cmd, reads, writes, then, capsys):
    """Each step's --help says what it reads, what it writes and the command that comes next."""
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in (*reads, *writes, then):
        assert " ".join(phrase.split()) in text, phrase
