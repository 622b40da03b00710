"""`train.strategy: fsdp` on gloo (2 CPU processes): the FSDP trainer matches the DDP trainer (losses, parameters
after 3 updates with gradient accumulation, clipping and gradient checkpointing, the evaluation's view of the
model); its checkpoint, written by 2 processes, resumes in 1 process and gives what continuing in 2 gives; bf16
goes through the mixed-precision policy. Dropout and drop-path are off: their masks differ between runs of
different world sizes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lfvila_model.train.distributed import DistInfo
from lfvila_model.train.loop import Trainer
from lfvila_model.train.runconfig import TrainConfig
from lfvila_model.train.tasks import PretrainTask
from lfvila_model.weights import read_state_dict
from tests.helpers import RandomSet, tiny_model

WORLD = 2
LOCAL = 2
NO_DROPOUT = dict(video={"drop_path_rate": 0.0}, text={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
# fp64, as test_ddp.py: AdamW divides by sqrt(v) + eps, which turns rounding noise in exactly-zero gradients (the
# key bias of attention) into visible updates, and that noise differs between one process and two
DTYPE = torch.float64


def _model(seed=0):
    return tiny_model(seed, **NO_DROPOUT).to(DTYPE)


def _data(model):
    d = RandomSet(model.config, n=8, seed=5)
    d.video = d.video.to(DTYPE)
    return d


def _cfg(out, batch, **changes):
    kw = dict(out_dir=out, max_steps=3, batch_size=batch, grad_accum=2, lr=1e-3, warmup_steps=0, clip_grad=0.5,
              progress=False, tensorboard=False, seed=4, device="cpu", log_every=1, keep_last=0)
    kw.update(changes)
    return TrainConfig(**kw)


def _checksum(model, step):
    return {"sum": float(sum(p.detach().double().sum() for p in model.parameters())),
            "plain": type(model).__name__ == "LFVILAPretrain"}


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def _trainer(out, batch, world, rank, seed=0, **changes):
    m = _model(seed)
    return Trainer(m, PretrainTask(m.config), _data(m), _cfg(out, batch, **changes),
                   DistInfo(rank=rank, world_size=world), evaluate=_checksum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # each rank draws its own init: both strategies train rank 0's
        res = {"ddp": _trainer(f"{root}/ddp", LOCAL, WORLD, rank, seed=rank).fit()["eval"]}
        t = _trainer(f"{root}/fsdp", LOCAL, WORLD, rank, seed=rank, strategy="fsdp", grad_checkpointing=True)
        res["fsdp"] = t.fit()["eval"]
        res["sharded"] = {n: (type(p).__name__, str(p.dtype)) for n, p in t.model.named_parameters()}
        # interrupted at 2 of 4 updates; the copy resumes in one process (test), this run continues in two
        _trainer(f"{root}/two", LOCAL, WORLD, rank, strategy="fsdp", max_steps=4, ckpt_every=1).fit(stop_at=2)
        if rank == 0:
            shutil.copytree(f"{root}/two/checkpoints", f"{root}/one/checkpoints")
        dist.barrier()
        _trainer(f"{root}/two", LOCAL, WORLD, rank, strategy="fsdp", max_steps=4).fit(resume=True)
        # bf16 through the mixed-precision policy: fp32 shards and optimizer state, bf16 compute
        m = tiny_model(0, **NO_DROPOUT)
        d = RandomSet(m.config, n=8, seed=5)
        for prec in ("fp32", "bf16"):
            tb = Trainer(m if prec == "fp32" else tiny_model(0, **NO_DROPOUT), PretrainTask(m.config), d,
                         _cfg(f"{root}/{prec}", LOCAL, strategy="fsdp", precision=prec, max_steps=1),
                         DistInfo(rank=rank, world_size=WORLD))
            tb.fit()
            res[prec] = {"dtypes": sorted({str(p.dtype) for p in tb.model.parameters()}),
                         "loss": _losses(f"{root}/{prec}") if rank == 0 else None}
        torch.save(res, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _one(rank: int, root: str) -> None:
    torch.set_num_threads(1)  # no process group: the trainer makes a 1-rank one for fully_shard
    t = _trainer(f"{root}/one", WORLD * LOCAL, 1, 0, strategy="fsdp", max_steps=4)
    t.fit(resume=True)
    torch.save({"world": dist.get_world_size()}, os.path.join(root, "one.pt"))
    dist.destroy_process_group()


def _spawn(fn, args, nprocs, timeout=240):
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the workers did not finish within {timeout} s")


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as root:
        _spawn(_two, (_free_port(), root), WORLD)
        _spawn(_one, (root,), 1)
        res = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
        out = {"res": res, "losses": {k: _losses(f"{root}/{k}") for k in ("ddp", "fsdp")},
               "files": {k: sorted(os.listdir(f"{root}/{k}/checkpoints/step-{s:08d}"))
                         for k, s in (("fsdp", 3), ("one", 4))},
               "dcp": sorted(os.listdir(f"{root}/fsdp/checkpoints/step-00000003/dcp")),
               "weights": {k: read_state_dict(f"{root}/{k}/checkpoints/step-{s:08d}")
                           for k, s in (("ddp", 3), ("fsdp", 3), ("two", 4), ("one", 4))},
               "two_ckpts": sorted(os.listdir(f"{root}/two/checkpoints")), "root": root}
        yield out


def test_fsdp_matches_ddp(runs):
    assert len(runs["losses"]["ddp"]) == 3
    torch.testing.assert_close(runs["losses"]["fsdp"], runs["losses"]["ddp"], rtol=1e-10, atol=1e-12)
    want = runs["weights"]["ddp"]
    got = runs["weights"]["fsdp"]  # the full weights the end of the FSDP run wrote (rank 0 gathered them)
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12, msg=k)
    ddp_eval, fsdp_eval = runs["res"][0]["ddp"], runs["res"][0]["fsdp"]
    assert fsdp_eval["plain"] and ddp_eval["plain"]  # evaluation sees an unsharded copy
    assert fsdp_eval["sum"] == pytest.approx(ddp_eval["sum"], rel=1e-12)


def test_fsdp_shards_every_parameter(runs):
    for r in runs["res"]:
        assert {t for t, _ in r["sharded"].values()} == {"DTensor"}


def test_fsdp_checkpoint_layout(runs):
    files = runs["files"]["fsdp"]
    assert {"dcp", "trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "config.json"} <= set(files)
    # one safetensors file per rank and nothing else: no pickled DCP metadata
    assert runs["dcp"] == [f"shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(WORLD)]
    # the last checkpoint of an interrupted run holds the full weights too
    assert runs["two_ckpts"] == ["latest", "step-00000001", "step-00000002", "step-00000004"]


def test_consolidate_fsdp_checkpoint(runs, tmp_path):
    from lfvila_model import load_pretrained
    from lfvila_model.train.fsdp import consolidate_fsdp_checkpoint

    root = runs["root"]
    # a periodic checkpoint holds the shards and the config, not the full weights
    step1 = f"{root}/two/checkpoints/step-00000001"
    assert "config.json" in os.listdir(step1) and "model.safetensors" not in os.listdir(step1)
    model = load_pretrained(consolidate_fsdp_checkpoint(step1, str(tmp_path / "one")))
    assert type(model).__name__ == "LFVILAPretrain"
    # the shards of the final checkpoint give the weights the run gathered on rank 0
    got = read_state_dict(consolidate_fsdp_checkpoint(f"{root}/fsdp/checkpoints/step-00000003", str(tmp_path / "f")))
    want = runs["weights"]["fsdp"]
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_two_process_checkpoint_resumes_in_one(runs):
    one, two = runs["weights"]["one"], runs["weights"]["two"]
    assert one.keys() == two.keys()
    for k, v in two.items():
        torch.testing.assert_close(one[k], v, rtol=1e-9, atol=1e-12, msg=k)
    assert "rng_rank1.pt" not in runs["files"]["one"]


def test_bf16_goes_through_the_policy(runs):
    r = runs["res"][0]
    assert r["fp32"]["dtypes"] == r["bf16"]["dtypes"] == ["torch.float32"]  # shards and the optimizer stay fp32
    (l32,), (l16,) = r["fp32"]["loss"], r["bf16"]["loss"]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05)


def test_strategy_is_validated():
    assert TrainConfig().strategy == "ddp"
    with pytest.raises(ValueError, match=r"train\.strategy must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ValueError, match="train.strategy"):
        TrainConfig.from_dict({"strategy": "FSDP"})


def test_resuming_with_the_other_strategy_is_refused(tmp_path):
    from lfvila_model.train.fsdp import check_checkpoint_strategy

    (tmp_path / "dcp").mkdir()
    with pytest.raises(ValueError, match="written with train.strategy=fsdp"):
        check_checkpoint_strategy(str(tmp_path), "ddp")
    check_checkpoint_strategy(str(tmp_path), "fsdp")


def test_demo_refuses_fsdp():
    from types import SimpleNamespace

    from lfvila_model.train.demo_task import prepare_demo_model

    with pytest.raises(ValueError, match="demo trains with train.strategy=ddp"):
        prepare_demo_model(SimpleNamespace(config=None), {}, TrainConfig(strategy="fsdp"), DistInfo(), False)
