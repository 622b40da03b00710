"""`data.kind: shards`: the streaming reader of WebDataset tar shards (lfvila_model/data/shard_stream.py).

The tests write their own shards in the version-1 format (webdataset.TarWriter, clips encoded with PyAV) and
check: items equal PretrainDataset's for the same samples (clips decoded from memory), the index is validated,
shards are dealt evenly and deterministically, unreadable samples are skipped and counted, every rank gets the
same number of batches from uneven shards, the batches do not depend on timing with DataLoader workers, a run
stopped mid-epoch and resumed equals the uninterrupted one bit for bit (with workers), and 2 nodes x 1 process
started by torchrun through the c10d rendezvous get the loss of one process on the global batch."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from lfvila_model import build_model
from lfvila_model.data.datasets import PretrainDataset, SkipTracker, TooManySkippedError
from lfvila_model.data.loader import TrainInput
from lfvila_model.data.shard_stream import (ShardStream, buffer_shuffle, deal_shards, read_shard_index,
                                            sample_number)
from lfvila_model.data.text import ParagraphTokenizer
from lfvila_model.data.video import load_video, write_video
from lfvila_model.train.checkpointing import latest_checkpoint
from lfvila_model.train.distributed import EpochBatches, mtc_generator
from lfvila_model.train.loop import Trainer
from lfvila_model.train.runconfig import DataConfig, TrainConfig
from lfvila_model.train.tasks import PretrainTask
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

NO_DROPOUT = dict(video={"drop_path_rate": 0.0}, text={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
WORDS = "a man cuts the onion then fries it in a pan and serves the dish to his family at the table".split()


def _config(dropout=True):
    text = {"vocab_size": 30522}  # the real (BERT uncased) tokenizer's ids
    if not dropout:
        text.update(NO_DROPOUT["text"])
    return tiny_config(text=text, video={} if dropout else NO_DROPOUT["video"])


@pytest.fixture(scope="module")
def tokenizer():
    mc = _config()
    return ParagraphTokenizer(num_sentences=mc.num_sentences, max_length=mc.max_sentence_len)


def _clip_bytes(tmp, rng, frames=4, h=32, w=48) -> bytes:
    path = os.path.join(tmp, "clip.mp4")
    write_video(path, rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
    with open(path, "rb") as f:
        return f.read()


def write_shards(out, per_shard, clips=(5, 4), seed=0, bad=(), broken_json=(), clip_dir=None):
    """Writes shards of ``per_shard[i]`` samples (sample n has ``clips[n % len(clips)]`` clips) and index.json;
    samples in ``bad`` get garbage bytes for clip 1, those in ``broken_json`` an unparsable json. With
    ``clip_dir`` the same clips also go to ``<clip_dir>/<video>/<clip_id>`` and ``<clip_dir>/pretrain.jsonl``."""
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, n, lines = [], 0, []
    for s, count in enumerate(per_shard):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(os.path.join(out, name), encoder=False, mtime=0) as tw:
            for _ in range(count):
                vid = f"vid{n:03d}"
                k = clips[n % len(clips)]
                ids = [f"{vid}.{j}.mp4" for j in range(k)]
                texts = [" ".join(rng.choice(WORDS, 5)) for _ in range(k)]
                sample = {"__key__": f"s{n:09d}",
                          "json": json.dumps({"video_id": vid, "clips": ids, "texts": texts}).encode()}
                for j in range(k):
                    data = _clip_bytes(out, rng)
                    if n in bad and j == 1:
                        data = b"not an mp4" * 50
                    sample[f"clip{j:03d}.mp4"] = data
                    if clip_dir is not None:
                        os.makedirs(os.path.join(clip_dir, vid), exist_ok=True)
                        with open(os.path.join(clip_dir, vid, ids[j]), "wb") as f:
                            f.write(data)
                if n in broken_json:
                    sample["json"] = b"{not json"
                tw.write(sample)
                lines.append([{"clip_id": c, "text": t} for c, t in zip(ids, texts)])
                n += 1
        entries.append({"name": name, "samples": count, "bytes": os.path.getsize(os.path.join(out, name))})
    os.remove(os.path.join(out, "clip.mp4"))
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"format": "lfvila-shards", "version": 1, "total": n, "shards": entries}, f)
    if clip_dir is not None:
        with open(os.path.join(clip_dir, "pretrain.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return out


def _stream(path, tok, **kw):
    mc = _config()
    args = dict(num_clips=mc.num_clips, frames_per_clip=mc.video.num_frames // mc.num_clips,
                size=tuple(mc.video.input_size), seed=3, shuffle_buffer=4)
    args.update(kw)
    return ShardStream(path, tok, **args)


# -- decoding from memory ----------------------------------------------------------------------------------------


def test_load_video_decodes_a_file_like_object_like_the_file(tmp_path):
    rng = np.random.default_rng(0)
    data = _clip_bytes(str(tmp_path), rng, frames=7)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    choose = lambda n: [0, n // 2, n - 1]  # noqa: E731
    want, wi = load_video(str(path), choose)
    got, gi = load_video(io.BytesIO(data), choose)
    assert np.array_equal(wi, gi) and np.array_equal(want, got)
    bad = io.BytesIO(b"garbage" * 20)
    bad.name = "shard-000000.tar/s000000001.clip000.mp4"
    from lfvila_model.data.video import VideoReadError

    with pytest.raises(VideoReadError, match="s000000001.clip000.mp4"):
        load_video(bad, choose)


def test_items_equal_pretrain_dataset_items(tmp_path, tokenizer):
    clips = tmp_path / "clips"
    shards = write_shards(str(tmp_path / "shards"), [3, 2], clip_dir=str(clips))
    stream = _stream(shards, tokenizer, shuffle_buffer=0)
    mc = _config()
    ds = PretrainDataset(str(clips / "pretrain.jsonl"), str(clips), tokenizer, num_clips=mc.num_clips,
                         frames_per_clip=mc.video.num_frames // mc.num_clips, size=tuple(mc.video.input_size),
                         train=True, seed=3)
    for epoch in (0, 2):
        stream.items.set_epoch(epoch)
        ds.set_epoch(epoch)
        samples = stream.raw_samples(epoch, 0, 1)
        seen = set()
        for _ in range(5):
            got = stream.item(next(samples))
            want = ds[got["index"]]
            seen.add(got["index"])
            assert got.keys() == want.keys()
            for k, v in want.items():
                if torch.is_tensor(v):
                    assert torch.equal(got[k], v), k
                else:
                    assert got[k] == v, k
        assert seen == set(range(5))  # one epoch of the only slot: every sample once


# -- the index, the deal, the shuffle ------------------------------------------------------------------------------


def test_read_shard_index_checks(tmp_path):
    shards = write_shards(str(tmp_path / "s"), [2, 1])
    idx = read_shard_index(shards)
    assert idx.total == 3 and idx.counts == [2, 1]
    assert read_shard_index(os.path.join(shards, "index.json")) == idx
    with pytest.raises(FileNotFoundError, match="no shard index"):
        read_shard_index(str(tmp_path))
    good = json.loads((tmp_path / "s" / "index.json").read_text())
    cases = [({"version": 2}, "version must be 1"), ({"format": "other"}, "format must be"),
             ({"total": 4}, "total must be the sum"),
             ({"shards": [dict(good["shards"][0], name="../x.tar")]}, "must be a file name"),
             ({"shards": [dict(good["shards"][0], name="missing.tar")], "total": 2}, "is missing"),
             ({"shards": [dict(good["shards"][0], samples=-1)]}, "samples must be an int")]
    for change, msg in cases:
        (tmp_path / "s" / "index.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(ValueError, match=msg):
            read_shard_index(shards)


def test_deal_shards_is_balanced_and_deterministic():
    counts = [100, 100, 100, 100, 100, 40, 7]
    a = deal_shards(counts, 3, seed=1, epoch=0)
    assert a == deal_shards(counts, 3, seed=1, epoch=0)
    assert sorted(i for s in a for i in s) == list(range(len(counts)))
    totals = sorted(sum(counts[i] for i in s) for s in a)
    assert totals[-1] - totals[0] <= 100
    assert any(deal_shards(counts, 3, seed=1, epoch=e) != a for e in range(1, 5))  # reshuffled per epoch


def test_buffer_shuffle_is_a_seeded_permutation():
    out = list(buffer_shuffle(iter(range(50)), 8, np.random.default_rng(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(buffer_shuffle(iter(range(50)), 8, np.random.default_rng(0)))
    assert list(buffer_shuffle(iter(range(5)), 0, np.random.default_rng(0))) == list(range(5))
    assert sample_number("s000000042") == 42 and sample_number("x.1") is None


def test_shuffle_buffer_config_is_validated():
    assert DataConfig(kind="shards", shuffle_buffer=0).shuffle_buffer == 0
    with pytest.raises(ValueError, match="data.shuffle_buffer"):
        DataConfig(shuffle_buffer=-1)


# -- batches, ranks, workers, skips --------------------------------------------------------------------------------


class _Task(PretrainTask):
    def __init__(self, frac=1.0):
        super().__init__(_config(), max_skip_fraction=frac)


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_unreadable_samples_are_replaced_and_counted(tmp_path, tokenizer):
    shards = write_shards(str(tmp_path / "s"), [4, 4], bad={2}, broken_json={5})
    stream = _stream(shards, tokenizer)
    batches = _take(stream.batches(2, 0, 1, lanes=1, per_epoch=3), 6)  # two epochs: every sample read
    tracker = SkipTracker(len(stream), 1.0)
    for b in batches:
        assert b["size"] == 2 and b["video"].shape[0] == 2  # replacements keep the batch full
        assert not {2, 5} & set(b["index"].tolist())
        tracker.update(b)
    assert set(tracker.skipped) == {2, 5}
    reasons = {i: r for i, (_, r) in tracker.skipped.items()}
    assert "JSONDecodeError" in reasons[5] and "cannot open" in reasons[2]
    with pytest.raises(TooManySkippedError):
        SkipTracker(len(stream), 0.1).update({"skipped": [b for x in batches for b in x["skipped"]]})


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path, tokenizer):
    shards = write_shards(str(tmp_path / "s"), [6, 1, 1])
    stream = _stream(shards, tokenizer)
    per_epoch = len(EpochBatches(len(stream), 2, 0, 2))  # from the index: 8 // (2 x 2) = 2
    assert per_epoch == 2
    for rank in range(2):  # rank 1's slot holds 2 samples of the 4 it needs per epoch: it starts over
        got = _take(stream.batches(2, rank, 2, lanes=1, per_epoch=per_epoch), 2 * per_epoch)
        assert all(b["size"] == 2 for b in got)
        assert [b["stream"]["epoch"] for b in got] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        stream.lanes_for(2, 4)
    assert stream.lanes_for(8, 1) == 3 and stream.lanes_for(8, 2) == 1 and stream.lanes_for(0, 1) == 1


def test_workers_deliver_the_lanes_in_order(tmp_path, tokenizer):
    shards = write_shards(str(tmp_path / "s"), [3, 3, 2])
    stream = _stream(shards, tokenizer)
    task = _Task()
    task.data_size = len(stream)
    # in this process: the lanes' batches interleaved by hand
    plan = dict(batch_size=2, rank=0, world_size=1, lanes=2, per_epoch=3)
    lanes = [stream.lane_batches(**plan, lane=k, start=1) for k in range(2)]
    want = [next(lanes[g % 2]) for g in range(1, 8)]
    inp = TrainInput(stream, task, EpochBatches(len(stream), 2), 3, "cpu", num_workers=2)
    assert inp.num_workers == 2 and inp.lanes == 2
    try:
        it = inp.start(0, 1)
        got = [next(it) for _ in range(7)]
    finally:
        inp.close()
    for w, g in zip(want, got):
        assert torch.equal(w["index"], g["index"]) and torch.equal(w["video"], g["video"])
    # batches 1..7 with 3 per epoch: lane 0 ended on batch 6, lane 1 on batch 7, each its first of epoch 2
    assert inp.stream_state() == {"lanes": 2, "cursors": [[2, 2], [2, 2]]}


def test_batches_pickle_for_spawned_workers(tmp_path, tokenizer):
    import pickle

    shards = write_shards(str(tmp_path / "s"), [2, 2])
    plan = _stream(shards, tokenizer).batches(2, 0, 1, lanes=1, per_epoch=2, start=1, cursors=[[0, 2]])
    a, b = next(iter(plan)), next(iter(pickle.loads(pickle.dumps(plan))))  # CUDA runs start workers by forkserver
    assert torch.equal(a["video"], b["video"]) and a["stream"] == b["stream"] == {"lane": 0, "epoch": 0,
                                                                                  "consumed": 4}


def test_other_lane_count_restarts_the_lanes(tmp_path, tokenizer, caplog):
    shards = write_shards(str(tmp_path / "s"), [2, 2])
    stream = _stream(shards, tokenizer)
    task = _Task()
    inp = TrainInput(stream, task, EpochBatches(len(stream), 2), 2, "cpu", num_workers=0)
    inp.load_stream_state({"lanes": 1, "cursors": [[3, 2]]})
    assert inp.cursors == [[3, 2]]
    with caplog.at_level("WARNING", logger="lfvila.data"):
        inp.load_stream_state({"lanes": 2, "cursors": [[3, 2], [3, 0]]})
    assert inp.cursors == [None] and "not bit-exactly" in caplog.text


# -- exact mid-epoch resume with workers ---------------------------------------------------------------------------


def _trainer(out, stream, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(_config())
    cfg = dict(out_dir=str(out), max_steps=6, batch_size=2, lr=1e-3, warmup_steps=1, clip_grad=1.0, progress=False,
               tensorboard=False, log_every=1, keep_last=5, seed=3, device="cpu")
    cfg.update(kw)
    return Trainer(model, PretrainTask(model.config, max_skip_fraction=0.5), stream, TrainConfig(**cfg),
                   num_workers=2, prefetch=2)


def test_resume_mid_epoch_is_exact_with_workers(tmp_path, tokenizer):
    shards = write_shards(str(tmp_path / "s"), [4, 3, 2], bad={4})
    stream = _stream(shards, tokenizer)
    full = _trainer(tmp_path / "full", stream)
    assert full.steps_per_epoch == 4 and full.input.num_workers == 2
    assert full.fit()["steps"] == 6
    want = {k: v.clone() for k, v in full.model.state_dict().items()}
    assert full.task.tracker is not None and 4 in full.task.tracker.skipped

    first = _trainer(tmp_path / "split", stream)
    first.fit(stop_at=3)  # mid-epoch, the lanes at different points
    st = torch.load(os.path.join(latest_checkpoint(str(tmp_path / "split" / "checkpoints")), "trainer_state.pt"),
                    weights_only=True)["state"]["stream"]
    assert len(st) == 1 and st[0]["lanes"] == 2 and all(c[0] == 0 for c in st[0]["cursors"])
    torch.manual_seed(999)
    np.random.seed(5)
    second = _trainer(tmp_path / "split", stream, seed=7)
    assert second.fit(resume=True)["steps"] == 6
    for k, v in want.items():
        assert torch.equal(second.model.state_dict()[k], v), k

    # the saved cursors matter: restarting the lanes at the epoch's start gives other batches
    third = _trainer(tmp_path / "split2", stream)
    third.fit(stop_at=3)
    fourth = _trainer(tmp_path / "split2", stream, seed=7)
    fourth.input.load_stream_state = lambda state: None
    fourth.fit(resume=True)
    assert any(not torch.equal(fourth.model.state_dict()[k], v) for k, v in want.items())


# -- 2 nodes x 1 process through torchrun's c10d rendezvous ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(shards, out, steps, batch):
    mc = _config(dropout=False)
    changes = {"video": mc.video.to_dict(), "text": mc.text.to_dict(), "max_sentence_len": mc.max_sentence_len,
               "proj_dim": mc.proj_dim, "pool_kernel": list(mc.pool_kernel)}
    return {"model": {"preset": "lfvila-tiny", "changes": json.loads(json.dumps(changes))},
            "data": {"kind": "shards", "train": shards, "num_workers": 0, "seed": 1, "shuffle_buffer": 3},
            "train": {"out_dir": out, "max_steps": steps, "batch_size": batch, "lr": 1e-3, "warmup_steps": 0,
                      "seed": 4, "device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False,
                      "log_every": 1}}


def test_two_nodes_by_torchrun_match_one_process(tmp_path):
    import yaml

    shards = write_shards(str(tmp_path / "s"), [3, 3, 2, 2])
    out = str(tmp_path / "run")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_run_config(shards, out, 2, 2)))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lfvila-shards-test",
           "-m", "lfvila_model", "pretrain", "--config", str(cfg_path)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    losses = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    state = torch.load(os.path.join(out, "checkpoints", "step-00000002", "trainer_state.pt"), weights_only=True)
    assert [st["cursors"] for st in state["state"]["stream"]] == [[[0, 4]], [[0, 4]]]  # both ranks' lanes

    # one process on the global batch: rank 0's rows then rank 1's, the same initial weights and MTC indices
    from lfvila_model.train.runconfig import load_run_config
    from lfvila_model.train.runner import build_model_from_config

    cfg = load_run_config(str(cfg_path))
    torch.manual_seed(4)  # the run seeds train.seed + rank before building the model; DDP keeps rank 0's
    model = build_model_from_config(cfg)
    mc = model.config
    tok = ParagraphTokenizer(num_sentences=mc.num_sentences, max_length=mc.max_sentence_len)
    stream = ShardStream(shards, tok, num_clips=mc.num_clips, frames_per_clip=mc.video.num_frames // mc.num_clips,
                         size=tuple(mc.video.input_size), seed=1, shuffle_buffer=3)
    per_epoch = len(EpochBatches(len(stream), 2, 0, 2))
    rows = [next(iter(stream.batches(2, r, 2, lanes=1, per_epoch=per_epoch))) for r in range(2)]
    batch = {k: torch.cat([rows[0][k], rows[1][k]]) for k in ("video", "input_ids", "attention_mask")}
    with torch.no_grad():
        want = float(PretrainTask(mc).loss(model, batch, mtc_generator(4, 0))["loss"])
        alone = float(PretrainTask(mc).loss(model, {k: v[:2] for k, v in batch.items()}, mtc_generator(4, 0))["loss"])
    assert losses[0]["train/loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert alone != pytest.approx(want, rel=1e-3)  # rank 1's rows count: the loss is the global batch's
