"""Retrieval metrics against hand-computed ranks, the temporal-order score, the JSON + PNG report."""

import json

import numpy as np
import pytest
import torch

from lfvila_model.eval import figure as FIG
from lfvila_model.eval import retrieval as R

# text i (row) <-> video i (column)
SIM = np.array([[0.9, 0.1, 0.3, 0.2],
                [0.5, 0.4, 0.6, 0.1],
                [0.2, 0.8, 0.7, 0.0],
                [0.3, 0.3, 0.3, 0.3]])
# t2v by hand: row 0 best -> 1; row 1: 0.5 and 0.6 beat 0.4 -> 3; row 2: 0.8 beats 0.7 -> 2;
#              row 3: three ties with 0.3, counted against the query -> 4
T2V = [1, 3, 2, 4]
# v2t by hand (columns): col 0 -> 1; col 1: 0.8 beats 0.4 -> 2; col 2: 0.7 is the top -> 1; col 3: 0.3 top -> 1
V2T = [1, 2, 1, 1]


def test_ranks_hand_computed():
    assert R.ranks_from_similarity(SIM).tolist() == T2V
    assert R.ranks_from_similarity(SIM.T).tolist() == V2T
    assert R.ranks_from_similarity(SIM, targets=[1, 1, 1, 1]).tolist() == [4, 3, 1, 4]  # row 3: all tie


def test_metrics_hand_computed():
    m = R.retrieval_metrics(SIM, ks=(1, 2, 5), return_ranks=True)
    assert m["t2v"] == {"R@1": 25.0, "R@2": 50.0, "R@5": 100.0, "MedR": 2.5, "MeanR": 2.5}
    assert m["v2t"] == {"R@1": 75.0, "R@2": 100.0, "R@5": 100.0, "MedR": 1.0, "MeanR": 1.25}
    assert m["ranks"] == {"t2v": T2V, "v2t": V2T} and m["num_queries"] == 4
    # default Ks and torch input give the same numbers
    mt = R.retrieval_metrics(torch.tensor(SIM, dtype=torch.float32))
    assert set(mt["t2v"]) == {"R@1", "R@5", "R@10", "R@50", "MedR", "MeanR"} and mt["t2v"]["R@1"] == 25.0


def test_ties_are_pessimistic_and_order_independent():
    const = np.ones((5, 5))
    assert R.ranks_from_similarity(const).tolist() == [5] * 5
    perm = np.random.default_rng(0).permutation(4)
    shuffled = SIM[perm][:, perm]  # same pairs, candidates in another order
    assert R.ranks_from_similarity(shuffled).tolist() == [T2V[i] for i in perm]


def test_metric_argument_checks():
    with pytest.raises(ValueError, match="square"):
        R.retrieval_metrics(np.zeros((2, 3)))
    bad = SIM.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"finite; entry \(1, 2\)"):
        R.retrieval_metrics(bad)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        R.retrieval_metrics([[1.0]])
    with pytest.raises(ValueError, match="ks must be positive"):
        R.retrieval_metrics(SIM, ks=(0,))
    with pytest.raises(ValueError, match="targets must be in"):
        R.ranks_from_similarity(SIM, targets=[0, 1, 2, 4])


def test_temporal_order_score_hand_case():
    scores = np.array([[3.0, 1.0, 2.0],   # true (0) strictly first -> win
                       [1.0, 5.0, 0.0],   # loses to candidate 1
                       [2.0, 2.0, 1.0]])  # tie with another order -> not a win
    assert R.temporal_order_score(scores) == pytest.approx(1 / 3)
    assert R.temporal_order_score(scores, true_index=[0, 1, 0]) == pytest.approx(2 / 3)
    assert R.temporal_order_score([[1.0, 0.0], [0.0, 1.0, 2.0]], true_index=[0, 2]) == 1.0  # ragged
    assert R.temporal_order_score(np.ones((3, 24))) == 0.0  # order-blind model
    with pytest.raises(ValueError, match="at least 2"):
        R.temporal_order_score([[1.0]])
    with pytest.raises(ValueError, match="out of range"):
        R.temporal_order_score(scores, true_index=[0, 0, 3])


def _decode_png(path):
    """The PNG as an (H, W, C) uint8 array, decoded by Pillow (installed with matplotlib), not by our code."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_json_and_png_written_and_valid(tmp_path):
    m = R.retrieval_metrics(SIM, return_ranks=True)
    m["temporal_order_score"] = np.float64(0.5)
    paths = R.write_metrics_json(tmp_path / "run1" / "eval" / "metrics.json", m)
    loaded = json.loads((tmp_path / "run1" / "eval" / "metrics.json").read_text())
    assert loaded["t2v"]["R@1"] == 25.0 and loaded["ranks"]["v2t"] == V2T and loaded["temporal_order_score"] == 0.5
    png = paths["png"]
    assert png == str(tmp_path / "run1" / "eval" / "metrics.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    img = _decode_png(png)
    assert img.shape == (640, 960, 3)  # the default width x height
    # not blank: mostly white background, but with ink, and both directions' colours (tab:blue, tab:orange)
    assert (img < 250).any(axis=2).mean() > 0.01
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert len(colours) > 50  # anti-aliased text and lines, not a flat fill
    assert not [f for f in (tmp_path / "run1" / "eval").iterdir() if ".tmp" in f.name]  # no temporary left


def test_figure_data_matches_metrics(tmp_path):
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(60, 60)) + 2.0 * np.eye(60)
    m = R.retrieval_metrics(sim, return_ranks=True)
    fig = FIG.retrieval_figure(tmp_path / "r.png", m["ranks"], width=800, height=500, run="my-run")
    assert _decode_png(tmp_path / "r.png").shape == (500, 800, 3)
    (ax,) = fig.axes
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert set(lines) == {"t2v", "v2t"}
    for d in ("t2v", "v2t"):
        k, rec = (np.asarray(a) for a in lines[d].get_data())
        assert np.array_equal(k, np.arange(1, 61))  # every K = 1..N
        for kk in (1, 5, 10, 50):
            assert rec[kk - 1] == pytest.approx(m[d][f"R@{kk}"])
        assert rec[-1] == 100.0 and np.all(np.diff(rec) >= 0)
        assert f"median rank {m[d]['MedR']:g}" in lines[d].get_label()
    assert ax.get_xscale() == "log"
    assert "my-run" in ax.get_title() and "N = 60" in ax.get_title()
    assert ax.get_xlabel() and "%" in ax.get_ylabel()
    assert [int(t) for t in ax.get_xticks()] == [1, 5, 10, 50, 60]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 2 and legend[0].startswith("t2v") and legend[1].startswith("v2t")
    # R@1, R@5, R@10 written on the plot
    notes = {t.get_text() for t in ax.texts}
    assert {f"{m[d][f'R@{kk}']:.1f}" for d in ("t2v", "v2t") for kk in (1, 5, 10)} <= notes


def test_figure_several_runs():
    a = {"t2v": np.array([1, 2, 3, 1]), "v2t": np.array([2, 1, 1, 4])}
    b = {"t2v": np.array([4, 3, 2, 1]), "v2t": np.array([1, 1, 1, 1])}
    fig = FIG.retrieval_figure(None, {"mtc": a, "no-mtc": b})
    (ax,) = fig.axes
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert list(lines) == ["mtc/t2v", "mtc/v2t", "no-mtc/t2v", "no-mtc/v2t"]
    assert list(lines["no-mtc/v2t"].get_ydata()) == [100.0] * 4
    assert list(lines["mtc/t2v"].get_ydata()) == [50.0, 75.0, 100.0, 100.0]
    assert "mtc" in ax.get_title() and "no-mtc" in ax.get_title() and "N = 4" in ax.get_title()
    assert len(fig.legends[0].get_texts()) == 4
    assert "R@1/5/10 50.0/100.0/100.0" in lines["mtc/t2v"].get_label()


def test_figure_rejects_bad_ranks():
    with pytest.raises(ValueError, match="at least one direction"):
        FIG.retrieval_figure(None, {})
    with pytest.raises(ValueError, match="ranks >= 1"):
        FIG.retrieval_figure(None, {"t2v": np.array([0, 1])})


def test_figure_leaves_the_global_backend_alone():
    import matplotlib

    before = matplotlib.get_backend()
    FIG.retrieval_figure(None, {"t2v": np.array([1, 2])})
    assert matplotlib.get_backend() == before


def test_json_written_before_a_missing_matplotlib_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "lfvila_model.eval.figure", raising=False)
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    m = R.retrieval_metrics(SIM, return_ranks=True)
    with pytest.raises(ImportError, match=r"pip install 'lfvila\[model\]'"):
        R.write_metrics_json(tmp_path / "metrics.json", m)
    assert json.loads((tmp_path / "metrics.json").read_text())["t2v"]["R@1"] == 25.0
    assert R.write_metrics_json(tmp_path / "m2.json", m, figure=False) == {"json": str(tmp_path / "m2.json")}
