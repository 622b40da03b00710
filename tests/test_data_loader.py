"""Training input through DataLoader workers (`lfvila_model.data.loader`): the worker count never changes a run
(0, 1, 2 workers: bitwise-equal weights), exact resume after kill -9 with workers, the epoch reaching persistent
workers, skip replacement by index in the worker and skip counting in the training process, the start method and
the data metrics."""

import json
import multiprocessing as mp
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from lfvila_model.data import loader as L
from lfvila_model.data.datasets import SkipTracker, TooManySkippedError
from lfvila_model.train.distributed import EpochBatches
from lfvila_model.train.loop import TrainConfig, Trainer
from lfvila_model.train.tasks import PretrainTask
from tests.helpers import RandomSet, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class ItemSet:
    """A map-style set like the file datasets (items, skip records, `set_epoch`), in memory: item i is a fixed
    random video plus noise drawn from (seed, epoch, i); the indices in `bad` are unreadable."""

    def __init__(self, cfg, n=8, bad=(), seed=2):
        self.base = RandomSet(cfg, n=n, seed=1)
        self.bad = set(bad)
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        if i in self.bad:
            return {"skipped": True, "index": i, "path": f"/videos/{i}.mp4", "reason": "file not found"}
        rng = np.random.default_rng([self.seed, self.epoch, i])
        video = self.base.video[i] + torch.from_numpy(rng.standard_normal(self.base.video[i].shape)).float()
        return {"video": video, "input_ids": self.base.ids[i], "attention_mask": self.base.mask[i],
                "num_sentences": int(self.base.mask[i, :, 0].sum()), "index": i, "video_id": f"v{i}"}


def _trainer(out, workers, bad=(), seed=0, **kw):
    model = tiny_model(seed)
    cfg = dict(out_dir=str(out), max_steps=4, batch_size=2, lr=1e-3, warmup_steps=1, clip_grad=1.0, progress=False,
               tensorboard=False, log_every=1, keep_last=5, seed=3, device="cpu")
    cfg.update(kw)
    return Trainer(model, PretrainTask(model.config, max_skip_fraction=0.5), ItemSet(model.config, n=6, bad=bad),
                   TrainConfig(**cfg), num_workers=workers, prefetch=2)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_worker_count_never_changes_the_weights(tmp_path):
    runs = {}
    for workers in (0, 1, 2):
        torch.manual_seed(11)
        t = _trainer(tmp_path / f"w{workers}", workers, bad=(4,))
        assert t.fit()["steps"] == 4 and t.steps_per_epoch == 3  # crosses an epoch boundary
        runs[workers] = (_params(t.model), t.task.tracker.count)
    want, skips = runs[0]
    assert skips == 1
    for workers in (1, 2):
        got, n = runs[workers]
        assert n == skips
        for k in want:
            assert torch.equal(got[k], want[k]), (workers, k)
    rec = [json.loads(x) for x in (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["train/data_fraction"] <= 1.0 and r["train/data_seconds"] >= 0.0 for r in rec)
    assert rec[-1]["train/skipped_videos"] == 1


def _killed_half(out):
    """The first half of a run in its own process, killed with SIGKILL right after the step-2 checkpoint."""
    torch.set_num_threads(1)
    torch.manual_seed(11)

    def die(model, step):
        os.kill(os.getpid(), signal.SIGKILL)

    t = _trainer(out, 2, ckpt_every=2, eval_every=2)
    t.evaluate_fn = die
    t.fit()


def test_resume_after_kill_with_workers_is_exact(tmp_path):
    torch.manual_seed(11)
    full = _trainer(tmp_path / "full", 2)
    full.fit()
    want = _params(full.model)

    p = mp.get_context("fork").Process(target=_killed_half, args=(str(tmp_path / "split"),))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    torch.manual_seed(999)  # other weights and RNG in the new process: everything comes from the checkpoint
    second = _trainer(tmp_path / "split", 2, seed=7)
    second.fit(resume=True)
    assert second.step == 4
    got = _params(second.model)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_epoch_reaches_persistent_workers():
    model = tiny_model(0)
    data = ItemSet(model.config, n=6)
    task = PretrainTask(model.config)
    task.data_size = len(data)
    batches = EpochBatches(6, 2, shuffle=True, seed=5)
    inp = L.TrainInput(data, task, batches, 3, "cpu", num_workers=2)
    got = [b for _, b in zip(range(6), inp.start(0, 1))]  # epoch 0 from position 1, then epoch 1
    inp.close()
    orders = [r for _, r in zip(range(6), L.BatchRequests(batches, 3).start_at(0, 1))]
    assert [e for e, _, _ in orders] == [0, 0, 1, 1, 1, 2]
    for (e, _, idx), b in zip(orders, got):
        ref = L.read_batch(ItemSet(model.config, n=6), idx, e)
        assert b["index"].tolist() == idx and torch.equal(b["video"], ref["video"])
    # the epoch changes the draws of the same item
    e0, e1 = L.read_batch(data, [3], 0), L.read_batch(data, [3], 1)
    assert not torch.equal(e0["video"], e1["video"])


def test_replacement_depends_on_the_index_and_skips_are_counted():
    model = tiny_model(0)
    data = ItemSet(model.config, n=6, bad=(2, 3))
    b = L.read_batch(data, [2, 0, 5])
    assert b["index"].tolist() == [4, 0, 5]  # 2 and 3 unreadable -> 4
    assert [s["index"] for s in b["skipped"]] == [2, 3] and b["skipped"][0]["path"] == "/videos/2.mp4"
    # a whole run of unreadable items: the batch carries the skips and the error, the trainer counts, then raises
    dead = ItemSet(model.config, n=6, bad=range(6))
    b = L.read_batch(dead, [1], max_replacements=3)
    assert b["size"] == 0 and len(b["skipped"]) == 4 and "no readable video near index 1" in b["error"]
    task = PretrainTask(model.config, max_skip_fraction=1.0)
    with pytest.raises(RuntimeError, match="no readable video"):
        task.take(b, "cpu", total=6)
    assert task.tracker.count == 4
    strict = PretrainTask(model.config, max_skip_fraction=0.2)
    with pytest.raises(TooManySkippedError, match="2 of 6 items"):
        strict.take(L.read_batch(data, [2, 0]), "cpu", total=6)
    # in-process counting and the single-process merge agree
    assert L.sync_skips(task.tracker) == 4 and L.sync_skips(None) == 0


def test_skip_bound_is_enforced_with_workers(tmp_path):
    torch.manual_seed(0)
    t = _trainer(tmp_path, 2, bad=(0, 1, 2, 3), max_steps=3)
    with pytest.raises(TooManySkippedError, match="max_skip_fraction=0.5"):
        t.fit()


def test_start_method_and_worker_defaults(monkeypatch):
    assert L.start_method("cpu") == "fork"
    assert L.start_method("cuda") in ("forkserver", "spawn")
    monkeypatch.setattr(L, "_cpus", lambda: 16)
    assert L.default_num_workers(1) == 8 and L.default_num_workers(4) == 3 and L.default_num_workers(16) == 0
    monkeypatch.setattr(L, "_cpus", lambda: 2)
    assert L.resolve_num_workers(None) == 1 and L.resolve_num_workers(0) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            L.resolve_num_workers(bad)
    with pytest.raises(ValueError, match="prefetch"):
        L.make_loader([], batch_size=1, prefetch=0)


def test_run_config_data_keys():
    from lfvila_model.train.runconfig import load_run_config

    cfg = load_run_config(None)
    assert cfg["data"]["num_workers"] is None and cfg["data"]["prefetch"] == 2
    with pytest.raises(ValueError, match="data.num_workers"):
        load_run_config(None, ["data.num_workers=-1"])
    with pytest.raises(ValueError, match="data.prefetch"):
        load_run_config(None, ["data.prefetch=0"])


def test_in_memory_sets_stay_in_process():
    model = tiny_model(0)
    data = RandomSet(model.config, n=4)
    inp = L.TrainInput(data, PretrainTask(model.config), EpochBatches(4, 2, seed=1), 2, "cpu", num_workers=2)
    assert inp.loader is None  # get_batch: no worker process
    b = next(inp.start(0))
    assert b["video"].shape[0] == 2 and inp.task.tracker is None


def test_frame_cache_pickles_for_spawned_workers(tmp_path):
    from lfvila_model.data import video as V

    p = tmp_path / "v.mp4"
    V.write_video(p, np.full((3, 16, 16, 3), 90, np.uint8), codec="mpeg4")
    cache = V.FrameCache("memory")
    frames = cache.get(p)
    copy = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(copy.get(p), frames) and copy.hits == 1
    tracker = pickle.loads(pickle.dumps(SkipTracker(3)))
    assert tracker.total == 3
