"""Optimizer groups (spec 4.1) and schedule values against hand computation."""

import math

import pytest
import torch
from torch import nn

from lfvila_model.train.optim import LRSchedule, Scheduler, build_optimizer, param_groups


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)  # weight: decay, bias: none
        self.LayerNorm = nn.LayerNorm(3)  # LayerNorm.weight / .bias: none
        self.norm1 = nn.LayerNorm(3)  # Swin-style norm weight: decay (as released); bias: none
        self.s_pos_embed = nn.Parameter(torch.zeros(3))  # pos_embed: none
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3))
        self.pooler = nn.Linear(3, 3)  # left out by default
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def _names(groups):
    return {wd: sorted(g["names"]) for g in groups for wd in [g["weight_decay"]]}


def test_official_groups():
    groups = param_groups(Named(), 0.05)
    got = _names(groups)
    assert got[0.05] == ["layer.weight", "norm1.weight"]
    assert got[0.0] == ["LayerNorm.bias", "LayerNorm.weight", "layer.bias", "norm1.bias",
                        "relative_position_bias_table", "s_pos_embed"]
    assert not any("pooler" in n or "frozen" in n for ns in got.values() for n in ns)


def test_pooler_option_and_optimizer_hparams():
    got = _names(param_groups(Named(), 0.05, include_pooler=True))
    assert "pooler.weight" in got[0.05] and "pooler.bias" in got[0.0]
    opt = build_optimizer(Named(), lr=5e-5)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 and g["lr"] == 5e-5
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_lr_scale_groups():
    groups = param_groups(Named(), 0.05, lr_scale={"layer.": 0.1}, base_lr=1e-3)
    scaled = [g for g in groups if "lr" in g]
    assert sorted(n for g in scaled for n in g["names"]) == ["layer.bias", "layer.weight"]
    assert all(g["lr"] == pytest.approx(1e-4) for g in scaled)


def test_ddp_wrapper_names_are_unwrapped():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = Named()

    assert _names(param_groups(Wrap())) == _names(param_groups(Named()))


def test_linear_schedule_by_hand():
    s = LRSchedule("linear", total_steps=10, warmup_steps=2, lr_min_rate=0.01)
    assert [s(0), s(1)] == [0.0, 0.5]
    assert s(2) == 1.0
    # after warm-up: 1 - 0.99 * (t - 2) / 8
    for t in range(2, 11):
        assert s(t) == pytest.approx(1 - 0.99 * (t - 2) / 8)
    assert s(50) == pytest.approx(0.01)


def test_step_and_cosine_by_hand():
    s = LRSchedule("step", total_steps=100, warmup_steps=5, step_size=10, gamma=0.25)
    assert s(3) == pytest.approx(0.6)
    assert [s(9), s(10), s(25)] == [1.0, 0.25, 0.0625]
    c = LRSchedule("cosine", total_steps=12, warmup_steps=2, min_lr=1e-8, base_lr=1e-4)
    floor = 1e-8 / 1e-4
    for t in (2, 7, 12):
        frac = (t - 2) / 10
        assert c(t) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    assert c(12) == pytest.approx(floor)


def test_scheduler_sets_lrs_and_resumes():
    m = Named()
    opt = build_optimizer(m, lr=1e-3, lr_scale={"layer.": 0.5})
    sch = Scheduler(opt, LRSchedule("linear", total_steps=10, warmup_steps=4))
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    for _ in range(3):
        sch.step()
    want = {1e-3 * 0.75, 0.5e-3 * 0.75}
    assert {round(g["lr"], 12) for g in opt.param_groups} == {round(w, 12) for w in want}
    opt2 = build_optimizer(Named(), lr=1e-3, lr_scale={"layer.": 0.5})
    sch2 = Scheduler(opt2, LRSchedule("linear", total_steps=10, warmup_steps=4))
    sch2.load_state_dict(sch.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("bad", [dict(kind="exp"), dict(total_steps=0), dict(warmup_steps=-1), dict(lr_min_rate=2.0)])
def test_schedule_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        LRSchedule(**bad)
