"""Retrieval metrics against hand-computed ranks, the temporal-order score, the JSON + PNG report."""

import json
import struct
import zlib

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


def test_json_and_png_written_and_valid(tmp_path):
    m = R.retrieval_metrics(SIM, return_ranks=True)
    m["temporal_order_score"] = np.float64(0.5)
    paths = R.write_metrics_json(tmp_path / "out" / "metrics.json", m)
    loaded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert loaded["t2v"]["R@1"] == 25.0 and loaded["ranks"]["v2t"] == V2T and loaded["temporal_order_score"] == 0.5
    png = paths["png"]
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # independent check of the chunk structure: IHDR first, with the right size, CRCs valid
    n, kind = struct.unpack(">I4s", data[8:16])
    body = data[16:16 + n]
    assert kind == b"IHDR" and struct.unpack(">II", body[:8]) == (720, 300)
    assert struct.unpack(">I", data[16 + n:20 + n])[0] == zlib.crc32(kind + body)
    img = FIG.read_png(png)
    assert img.shape == (300, 720, 3)
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert FIG.BLUE in colours and FIG.ORANGE in colours  # both directions are drawn
    # corrupting one byte of the image data breaks the CRC
    bad = bytearray(data)
    bad[60] ^= 0xFF
    (tmp_path / "bad.png").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC mismatch"):
        FIG.read_png(tmp_path / "bad.png")


def test_png_round_trip_exact(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    FIG.write_png(tmp_path / "x.png", img)
    assert np.array_equal(FIG.read_png(tmp_path / "x.png"), img)


def test_png_reader_handles_all_filters(tmp_path):
    # a PNG written independently here with each scanline filter (0..4), as other encoders produce
    rng = np.random.default_rng(1)
    h, w = 5, 4
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = img.reshape(h, w * 3).astype(int)
    rows = []
    for y in range(h):
        ft = y % 5
        prev = x[y - 1] if y else np.zeros(w * 3, int)
        enc = []
        for i in range(w * 3):
            a = x[y, i - 3] if i >= 3 else 0
            b, c = prev[i], (prev[i - 3] if i >= 3 else 0)
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
            pred = [0, a, b, (a + b) // 2, paeth][ft]
            enc.append((x[y, i] - pred) % 256)
        rows.append(bytes([ft] + enc))
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))  # noqa: E731
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    (tmp_path / "f.png").write_bytes(data)
    assert np.array_equal(FIG.read_png(tmp_path / "f.png"), img)
