"""Checkpoints: exact resume (4 steps == 2 steps + resume + 2 steps, parameter for parameter, with dropout,
drop-path, data shuffling and MTC sampling active), atomic writes, keep-last-N, RNG round trip."""

import os
import random

import numpy as np
import pytest
import torch

from lfvila_model.train import checkpointing as ck
from lfvila_model.train.loop import Trainer
from lfvila_model.train.runconfig import TrainConfig
from lfvila_model.train.tasks import PretrainTask
from tests.helpers import RandomSet, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out, seed=0, **kw):
    model = tiny_model(seed)
    data = RandomSet(model.config, n=6)
    cfg = dict(out_dir=str(out), max_steps=4, batch_size=2, lr=1e-3, warmup_steps=1, clip_grad=1.0, progress=False,
               tensorboard=False, log_every=1, keep_last=5, seed=3, device="cpu")
    cfg.update(kw)
    return Trainer(model, PretrainTask(model.config), data, TrainConfig(**cfg))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    torch.manual_seed(11)
    full = _trainer(tmp_path / "full")
    s = full.fit()
    assert s["steps"] == 4 and full.steps_per_epoch == 3  # the resumed half crosses an epoch boundary
    want = _params(full.model)

    torch.manual_seed(11)
    first = _trainer(tmp_path / "split")
    first.fit(stop_at=2)
    assert first.step == 2
    # a different process: other initial weights and RNG; everything must come from the checkpoint
    torch.manual_seed(999)
    np.random.seed(5)
    second = _trainer(tmp_path / "split", seed=7)
    second.fit(resume=True)
    assert second.step == 4
    got = _params(second.model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the optimizer moments agree too
    a, b = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for i in a:
        assert torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"])
    # and the run really depends on the RNG: without restoring it the result differs
    torch.manual_seed(11)
    third = _trainer(tmp_path / "norng")
    third.fit(stop_at=2)
    ck_path = ck.latest_checkpoint(str(tmp_path / "norng" / "checkpoints"))
    torch.manual_seed(12345)
    torch.save(ck.rng_state(), os.path.join(ck_path, "rng_rank0.pt"))  # a wrong RNG state
    fourth = _trainer(tmp_path / "norng", seed=7)
    fourth.fit(resume=True)
    assert any(not torch.equal(v, want[k]) for k, v in _params(fourth.model).items())


def test_metrics_and_event_files(tmp_path):
    t = _trainer(tmp_path, max_steps=2, tensorboard=True)
    t.fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"train/vpc"' in lines[0] and '"train/lr"' in lines[0]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_grad_accumulation_matches_big_batch(tmp_path):
    """2 micro-batches of 1 == 1 batch of 2 for the update when the losses are per-sample means ... of a loss
    without cross-sample terms; LF-VILA's contrastive losses are not, so only check it runs and steps."""
    t = _trainer(tmp_path, max_steps=2, batch_size=1, grad_accum=2)
    assert t.fit()["steps"] == 2


def test_atomic_checkpoint_survives_a_crash(tmp_path, monkeypatch):
    t = _trainer(tmp_path, max_steps=2)
    t.fit()
    ckdir = str(tmp_path / "checkpoints")
    good = ck.latest_checkpoint(ckdir)
    assert good.endswith("step-00000002")
    before = {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)}

    real_save = torch.save

    def crash(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", crash)
    t.step = 3
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert ck.latest_checkpoint(ckdir) == good
    assert [os.path.basename(p) for p in ck.list_checkpoints(ckdir)] == ["step-00000002"]
    assert {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)} == before
    fresh = _trainer(tmp_path, seed=4, max_steps=2)
    assert fresh.resume() and fresh.step == 2
    # the next save removes the half-written temp directory
    t.save()
    assert not [d for d in os.listdir(ckdir) if d.endswith(".tmp")]
    assert ck.latest_checkpoint(ckdir).endswith("step-00000003")


def test_keep_last_n(tmp_path):
    t = _trainer(tmp_path, max_steps=4, ckpt_every=1, keep_last=2)
    t.fit()
    names = [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path / "checkpoints"))]
    assert names == ["step-00000003", "step-00000004"]


def test_trainer_state_loads_without_pickled_objects(tmp_path):
    t = _trainer(tmp_path, max_steps=1)
    t.fit()
    path = ck.latest_checkpoint(str(tmp_path / "checkpoints"))
    for f in ("trainer_state.pt", "rng_rank0.pt"):
        torch.load(os.path.join(path, f), weights_only=True)  # raises if anything but plain data was pickled


def test_rng_state_round_trip():
    st = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resume_without_checkpoint_returns_false(tmp_path):
    assert _trainer(tmp_path, max_steps=1).resume() is False
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(str(tmp_path), tiny_model())


def test_stage2_and_retrieval_tasks_take_steps(tmp_path):
    """Stage 2 (MLM + VTM, stage-1 parts frozen) and retrieval fine-tuning run through the same trainer."""
    from tests.helpers import tiny_config
    from lfvila_model import build_model
    from lfvila_model.train.tasks import RetrievalTask, mask_tokens

    torch.manual_seed(0)
    m2 = build_model(tiny_config(stage=2))
    data = RandomSet(m2.config, n=4)

    class Tok:  # the ids of the nano vocabulary
        mask_token_id, cls_token_id, sep_token_id, pad_token_id = 3, 1, 2, 0

    frozen = {k: v.clone() for k, v in m2.video_encoder.state_dict().items()}
    t = Trainer(m2, PretrainTask(m2.config, stage=2, tokenizer=Tok()), data,
                TrainConfig(out_dir=str(tmp_path / "s2"), max_steps=2, batch_size=2, lr=1e-3, progress=False,
                            tensorboard=False, device="cpu", warmup_steps=0))
    assert t.fit()["steps"] == 2
    assert all(torch.equal(v, frozen[k]) for k, v in m2.video_encoder.state_dict().items())
    lines = (tmp_path / "s2" / "metrics.jsonl").read_text()
    assert "train/vtm" in lines and "train/mlm" in lines

    mr = build_model(tiny_config(model_type="retrieval"))
    t = Trainer(mr, RetrievalTask(), RandomSet(mr.config, n=4),
                TrainConfig(out_dir=str(tmp_path / "ret"), max_steps=1, batch_size=2, progress=False,
                            tensorboard=False, device="cpu", schedule="step", warmup_steps=0))
    assert t.fit()["steps"] == 1

    ids = torch.randint(5, 100, (2, 4, 6))
    mask = torch.ones_like(ids)
    ids[:, :, 0] = 1
    masked, labels = mask_tokens(ids, mask, 120, 3, [0, 1, 2], torch.Generator().manual_seed(0), prob=0.5)
    assert bool((labels[:, :, 0] == -100).all())  # [CLS] never masked
    chosen = labels != -100
    assert chosen.any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
