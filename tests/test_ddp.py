"""DDP on gloo: 2 processes give the same loss and gradients as 1 process on the same global batch (stage-1 VPC +
MTC: features all-gathered with gather_with_grad, MTC indices drawn for the global batch from the per-step
generator), and the same parameters after 2 trainer updates (batches from EpochBatches, multi-rank checkpoint).
Dropout and drop-path are off: their masks would differ between one process and two."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lfvila_model.train.distributed import DistInfo, EpochBatches, mtc_generator
from lfvila_model.train.loop import Trainer
from lfvila_model.train.runconfig import TrainConfig
from lfvila_model.train.tasks import PretrainTask
from tests.helpers import RandomSet, tiny_model

WORLD = 2
LOCAL = 2
NO_DROPOUT = dict(video={"drop_path_rate": 0.0}, text={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})


def _model(dtype=torch.float64):
    return tiny_model(0, **NO_DROPOUT).to(dtype)


def _data(model, dtype=torch.float64):
    d = RandomSet(model.config, n=8, seed=5)
    d.video = d.video.to(dtype)
    return d


def _train_cfg(out, batch):
    return TrainConfig(out_dir=out, max_steps=2, batch_size=batch, lr=1e-3, warmup_steps=0, clip_grad=None,
                       progress=False, tensorboard=False, seed=4, device="cpu", log_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _model()
        data = _data(model)
        ddp = DDP(model, find_unused_parameters=True)
        task = PretrainTask(model.config)
        rows = list(range(rank * LOCAL, (rank + 1) * LOCAL))
        out = task.loss(ddp, data.get_batch(rows), mtc_generator(4, 0))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res = {"loss": out["loss"].detach(), "vpc": out["vpc"].detach(), "mtc": out["mtc"].detach(), "grads": grads}

        m2 = _model()
        t = Trainer(m2, PretrainTask(m2.config), _data(m2), _train_cfg(out_dir, LOCAL),
                    DistInfo(rank=rank, world_size=WORLD))
        t.fit()
        res["params"] = {k: v.clone() for k, v in m2.state_dict().items()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="fork")
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the distributed workers did not finish within 180 s")
        ck = sorted(os.listdir(os.path.join(out_dir, "checkpoints")))
        res = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
        return res, ck


def test_loss_and_gradients_match_one_process(results):
    res, _ = results
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        data = _data(model)
        out = PretrainTask(model.config).loss(model, data.get_batch(list(range(WORLD * LOCAL))), mtc_generator(4, 0))
        out["loss"].backward()
    finally:
        torch.set_num_threads(n)
    for r in res:
        for k in ("loss", "vpc", "mtc"):
            torch.testing.assert_close(r[k], out[k].detach(), rtol=1e-10, atol=1e-12)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for r in res:
        assert r["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-8, atol=1e-11, msg=name)


def test_two_updates_match_one_process(results, tmp_path):
    # fp64: AdamW divides by sqrt(v) + 1e-8, which turns fp32 rounding noise in exactly-zero gradients (the key
    # bias of attention) into visible updates; in fp64 that noise is far below eps
    res, ckpts = results
    assert "step-00000002" in ckpts
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = _model()
        Trainer(m, PretrainTask(m.config), _data(m), _train_cfg(str(tmp_path), WORLD * LOCAL)).fit()
    finally:
        torch.set_num_threads(n)
    want = m.state_dict()
    for r in res:
        for k, v in want.items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-9, atol=1e-12, msg=k)
    for k in want:  # the ranks stay identical
        assert torch.equal(res[0]["params"][k], res[1]["params"][k])


def test_epoch_batches_global_batch_is_world_size_independent():
    one = list(EpochBatches(10, 4, 0, 1, seed=2).batches(3))
    two = [list(EpochBatches(10, 2, r, 2, seed=2).batches(3)) for r in range(2)]
    assert len(one) == len(two[0]) == 2
    for k, b in enumerate(one):
        assert two[0][k] + two[1][k] == b
    # resuming at batch 1 gives the rest of the epoch
    assert list(EpochBatches(10, 4, seed=2).batches(3, start=1)) == one[1:]


def test_epoch_batches_keep_groups_together():
    groups = torch.arange(12) // 2  # pairs, like the demo's two orders of an event set
    eb = EpochBatches(12, 4, seed=1, groups=groups)
    seen = []
    for b in eb.batches(0):
        assert len(b) == 4
        for i in b:
            assert (i ^ 1) in b  # the partner is in the same batch
        seen += b
    assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError, match="same size"):
        EpochBatches(12, 3, groups=groups)
