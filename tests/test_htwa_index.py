"""The HTWA geometry of the CPU and CUDA kernels: csrc/htwa_geometry.h (compiled on its own by g++ through
tests/htwa_index_driver.cpp) and its Python mirror lfvila_kernels/geometry.py, against the official
relative_position_index and the formulas of csrc/HTWA_CONTRACT.md.

This runs without a GPU; it checks the index math the kernels use, not the kernels themselves."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess

import pytest
import torch

from lfvila_kernels import geometry as hi
from lfvila_kernels.reference import relative_position_index
from lfvila_kernels.shapes import official_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases():
    """(grid, window, shift, bias_window): the official reduced cases plus ragged, shifted and bias_window > window
    geometries."""
    cases = [(c.grid, c.window, c.shift, c.bias_window) for c in official_cases(reduced=True)]
    cases += [
        ((5, 7, 9), (2, 3, 4), (1, 1, 3), (2, 3, 4)),
        ((3, 5, 5), (3, 5, 5), (0, 0, 0), (4, 6, 7)),
        ((4, 6, 5), (2, 3, 5), (1, 2, 0), (3, 4, 6)),
        ((1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)),
        ((7, 3, 2), (4, 2, 2), (3, 1, 1), (5, 2, 3)),
    ]
    rng = random.Random(0)
    for _ in range(6):
        grid = tuple(rng.randint(1, 9) for _ in range(3))
        window = tuple(rng.randint(1, g) for g in grid)
        shift = tuple(rng.randint(0, w - 1) for w in window)
        bias_window = tuple(w + rng.randint(0, 2) for w in window)
        cases.append((grid, window, shift, bias_window))
    return list(dict.fromkeys(cases))  # layers 3 and 4 share a geometry


CASES = _cases()


def _contract_row(nq: int, nk: int, bias_window) -> int:
    """The contract's row formula, written out literally."""
    bt_, bh_, bw_ = bias_window

    def split(n):
        return n // (bh_ * bw_), (n // bw_) % bh_, n % bw_

    tq, hq, wq = split(nq)
    tk, hk, wk = split(nk)
    return ((tq - tk + bt_ - 1) * (2 * bh_ - 1) + (hq - hk + bh_ - 1)) * (2 * bw_ - 1) + (wq - wk + bw_ - 1)


@pytest.mark.parametrize("window", [(1, 1, 1), (2, 3, 5), (4, 3, 5), (2, 2, 2), (3, 1, 4)])
def test_bias_rows_equal_official_index_when_bias_window_is_window(window):
    assert torch.equal(hi.bias_rows(window, window), relative_position_index(window))


@pytest.mark.parametrize("grid,window,shift,bias_window", CASES)
def test_bias_rows_equal_official_quirk_and_contract(grid, window, shift, bias_window):
    rows = hi.bias_rows(window, bias_window)
    n = rows.shape[0]
    # the official quirk: the index buffer of the configured window, cut to the effective window (top-left block)
    assert torch.equal(rows, relative_position_index(bias_window)[:n, :n])
    for nq, nk in itertools.product(range(n), repeat=2):
        if (nq * 7 + nk) % 11 == 0 or n <= 30:
            assert rows[nq, nk].item() == _contract_row(nq, nk, bias_window)
    assert rows.min().item() >= 0 and rows.max().item() < hi.num_bias_rows(bias_window)


@pytest.mark.parametrize("grid,window,shift,bias_window", CASES)
def test_bias_inverse_is_the_exact_inverse(grid, window, shift, bias_window):
    offsets, pairs = hi.bias_inverse(window, bias_window)
    rows = hi.bias_rows(window, bias_window).flatten()
    n_rows = hi.num_bias_rows(bias_window)
    assert offsets.shape == (n_rows + 1,) and pairs.shape == rows.shape
    assert offsets[0].item() == 0 and offsets[-1].item() == rows.numel()
    pairs = pairs.long()
    assert torch.equal(torch.sort(pairs).values, torch.arange(rows.numel()))  # a permutation of all pairs
    # slot p of `pairs` lies in row r's segment iff offsets[r] <= p < offsets[r + 1]; it must hold a pair of row r
    counts = (offsets[1:] - offsets[:-1]).long()
    assert (counts >= 0).all()
    row_of_slot = torch.repeat_interleave(torch.arange(n_rows), counts)
    assert torch.equal(rows[pairs], row_of_slot)
    # ascending inside each segment (the fixed gather order)
    same = row_of_slot[1:] == row_of_slot[:-1]
    assert (pairs[1:][same] > pairs[:-1][same]).all()


@pytest.mark.parametrize("grid,window,shift,bias_window", CASES)
def test_axis_boxes_match_group_definition(grid, window, shift, bias_window):
    for length, win, s in zip(grid, window, shift):
        groups = [(x - s) // win for x in range(length)]  # Python floors: g(x) of the contract
        runs = []
        for x, gx in enumerate(groups):
            if x == 0 or gx != groups[x - 1]:
                runs.append([x, 0])
            runs[-1][1] += 1
        boxes = hi.axis_boxes(length, win, s)
        assert [(b[0], b[1]) for b in boxes] == [tuple(r) for r in runs]
        assert len(boxes) == hi.num_boxes(length, win, s)
        for start, size, c0 in boxes:
            assert c0 == (start - s) % win and c0 + size <= win


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    assert cxx is not None, "a C++ compiler is needed (it builds the extension too)"
    exe = tmp_path_factory.mktemp("htwa_index") / "driver"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
         os.path.join(ROOT, "tests", "htwa_index_driver.cpp"), "-o", str(exe)],
        check=True,
    )
    return str(exe)


def _run_driver(driver, grid, window, shift, bias_window):
    out = subprocess.run([driver, *map(str, (*grid, *window, *shift, *bias_window))], check=True,
                         capture_output=True, text=True).stdout
    parsed = {"boxes": []}
    for line in out.splitlines():
        key, *vals = line.split()
        if key == "nbox":  # "nbox <total> nwin <N>"
            parsed["nbox"], parsed["nwin"] = int(vals[0]), int(vals[2])
            continue
        vals = [int(v) for v in vals]
        if key == "boxes":
            parsed["boxes"].append(tuple(vals))
        else:
            parsed[key] = vals
    return parsed


@pytest.mark.parametrize("grid,window,shift,bias_window", CASES)
def test_cpp_header_agrees_with_python(driver, grid, window, shift, bias_window):
    got = _run_driver(driver, grid, window, shift, bias_window)
    expect_boxes = [(a, *b) for a in range(3) for b in hi.axis_boxes(grid[a], window[a], shift[a])]
    assert got["boxes"] == expect_boxes
    nbox = 1
    for a in range(3):
        nbox *= hi.num_boxes(grid[a], window[a], shift[a])
    assert got["nbox"] == nbox and got["nwin"] == window[0] * window[1] * window[2]
    assert got["rows"] == hi.bias_rows(window, bias_window).flatten().tolist()
    offsets, pairs = hi.bias_inverse(window, bias_window)
    assert got["offsets"] == offsets.tolist()
    assert got["pairs"] == pairs.tolist()
    checked, failures = got["roundtrip"]
    assert checked == grid[0] * grid[1] * grid[2] and failures == 0
    assert got["coverage"] == [grid[0] * grid[1] * grid[2], 0]
