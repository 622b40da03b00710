"""train.best_metric: the weights of the best evaluation are kept in out_dir/best/ (save_pretrained format) with
best.json, chosen by a named metric (dotted for nested ones), max or min, and the choice survives a resume."""

import json

import pytest
import torch

from lfvila_model.factory import load_pretrained
from lfvila_model.train.loop import Trainer, metric_value
from lfvila_model.train.runconfig import TrainConfig
from lfvila_model.train.tasks import PretrainTask
from tests.helpers import RandomSet, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out, values, snapshots, **kw):
    """A nano trainer whose evaluation at step s returns values[s - 1] (as accuracy and as t2v.R@1) and records the
    weights it saw."""
    model = tiny_model(0)
    data = RandomSet(model.config, n=6)
    cfg = dict(out_dir=str(out), max_steps=4, batch_size=2, lr=1e-2, warmup_steps=1, progress=False, tensorboard=False,
               log_every=1, seed=3, device="cpu", eval_every=1)
    cfg.update(kw)

    def evaluate(m, step):
        snapshots[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        v = values[step - 1]
        return {"accuracy": v, "num_examples": 10, "t2v": {"R@1": v, "MedR": 100 - v}}

    return Trainer(model, PretrainTask(model.config), data, TrainConfig(**cfg), evaluate=evaluate)


def _assert_best_weights(out, step, snapshots):
    got = load_pretrained(str(out / "best")).state_dict()
    want = snapshots[step]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("metric,mode,best_step", [("accuracy", "max", 2), ("t2v.R@1", "max", 2),
                                                   ("t2v.MedR", "min", 2), ("accuracy", "min", 1)])
def test_best_weights_are_kept(tmp_path, metric, mode, best_step):
    values = [50.0, 80.0, 60.0, 70.0]
    snaps = {}
    t = _trainer(tmp_path, values, snaps, best_metric=metric, best_mode=mode)
    summary = t.fit()
    assert sorted(snaps) == [1, 2, 3, 4]  # evaluated after every update, the last one once
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    want_value = values[best_step - 1] if metric != "t2v.MedR" else 100 - values[best_step - 1]
    assert best == {"step": best_step, "metric": metric, "value": want_value}
    assert summary["best"] == best
    _assert_best_weights(tmp_path, best_step, snaps)
    # the weights did change after the best step, so the check above can tell them apart
    assert any(not torch.equal(v, snaps[4][k]) for k, v in snaps[best_step].items())


def test_best_survives_resume(tmp_path):
    values = [50.0, 80.0, 60.0, 70.0]
    snaps = {}
    first = _trainer(tmp_path, values, snaps, best_metric="accuracy")
    first.fit(stop_at=2)
    assert first.best == {"step": 2, "metric": "accuracy", "value": 80.0}
    second = _trainer(tmp_path, values, snaps, best_metric="accuracy")
    summary = second.fit(resume=True)
    assert summary["best"]["step"] == 2  # 60 and 70 after the resume do not replace 80
    _assert_best_weights(tmp_path, 2, snaps)


def test_unknown_metric_names_the_available_ones(tmp_path):
    t = _trainer(tmp_path, [1.0] * 4, {}, best_metric="t2v.R@5", max_steps=1)
    with pytest.raises(KeyError, match=r"'t2v.R@5'.*'accuracy'.*'t2v.MedR'.*'t2v.R@1'"):
        t.fit()


def test_bad_settings():
    with pytest.raises(ValueError, match="train.best_mode must be max or min"):
        TrainConfig(best_mode="best")
    with pytest.raises(TypeError, match="must name a number"):
        metric_value({"t2v": {"R@1": 3.0}}, "t2v")
