"""The Triton HTWA kernels on the CPU through the Triton interpreter, against `htwa_reference` (fp64 autograd).

The interpreter runs one program at a time in Python, so shapes are small (B=1, 1-2 heads) but every official
(layer, shifted) geometry, ragged grid, the bias_window quirk, bias None, strided views and multi-tile loops are
kept. Errors are max |x - ref| / max |ref| per tensor.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (here or through lfvila_kernels)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from lfvila_kernels import htwa_attention  # noqa: E402
from lfvila_kernels import geometry  # noqa: E402
from lfvila_kernels.backends.triton import triton_interpreted  # noqa: E402
from lfvila_kernels.reference import htwa_reference  # noqa: E402
from lfvila_kernels.shapes import official_cases  # noqa: E402
from lfvila_kernels.triton import experimental as exp  # noqa: E402
from lfvila_kernels.triton import htwa_launch as tk  # noqa: E402

if not torch.cuda.is_available():
    # the root conftest.py selects the interpreter before anything imports triton
    assert triton_interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported (see conftest.py)"


def _nbias(bw):
    return (2 * bw[0] - 1) * (2 * bw[1] - 1) * (2 * bw[2] - 1)


def _inputs(B, grid, heads, D, bias_window, dtype, bias=True, layout="qkv", seed=0):
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid
    if layout == "qkv":  # views of a qkv projection: token stride 3 * heads * D
        qkv = torch.randn(B, T, H, W, 3, heads, D, generator=g).to(dtype)
        q, k, v = qkv.unbind(4)
    else:  # head-major storage permuted into (B, T, H, W, heads, D): unrelated strides for each tensor
        q, k, v = (torch.randn(B, heads, T, H, W, D, generator=g).to(dtype).permute(0, 2, 3, 4, 1, 5)
                   for _ in range(3))
    table = torch.randn(_nbias(bias_window), heads, generator=g) if bias else None
    dout = torch.randn(B, T, H, W, heads, D, generator=g).to(dtype)  # non-unit upstream gradient
    return q, k, v, table, dout


def _reference(q, k, v, table, dout, **kw):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    tab = None if table is None else table.detach().double().requires_grad_()
    out = htwa_reference(*leaves, tab, **kw)
    out.backward(dout.double())
    return out.detach(), [x.grad for x in leaves], (None if tab is None else tab.grad)


def _triton(q, k, v, table, dout, **kw):
    """Through the public op (custom op + register_autograd), so the op layer is covered too."""
    # keep the views: the kernels read q/k/v through their strides
    leaves = [x.detach() for x in (q, k, v)]
    for x in leaves:
        x.requires_grad_()
    tab = None if table is None else table.detach().clone().requires_grad_()
    out = htwa_attention(*leaves, tab, backend="triton", **kw)
    out.backward(dout)
    return out.detach(), [x.grad for x in leaves], (None if tab is None else tab.grad)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(q, k, v, table, dout, tol, **kw):
    ref_out, ref_g, ref_db = _reference(q, k, v, table, dout, **kw)
    out, g, db = _triton(q, k, v, table, dout, **kw)
    assert out.dtype == q.dtype and out.is_contiguous()
    errs = {"out": _rel(out, ref_out)}
    errs.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), g, ref_g)})
    if table is not None:
        assert db.dtype == table.dtype and db.shape == table.shape
        errs["dbias"] = _rel(db, ref_db)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"rel err above {tol}: {bad} (all: {errs})"


def _distinct(cases):
    """Layers 3 and 4 share one shape (grid, window, shift, heads): the interpreter runs it once."""
    seen, out = set(), []
    for c in cases:
        key = (c.grid, c.window, c.shift, c.bias_window, c.heads)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


_CASES = _distinct(official_cases(reduced=True))


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_official_cases_fp32(case):
    heads = 2 if case.name == "layer0" else 1  # one case with several heads covers the head offsets
    q, k, v, table, dout = _inputs(1, case.grid, heads, case.head_dim, case.bias_window, torch.float32)
    _check(q, k, v, table, dout, 1e-4, window=case.window, shift=case.shift, bias_window=case.bias_window)


@pytest.mark.parametrize(
    "grid,window,shift,bias_window,D",
    [
        ((5, 7, 9), (2, 3, 4), (1, 1, 2), None, 20),  # ragged at both ends of every axis, D padded to 32
        ((3, 5, 4), (3, 2, 3), (0, 1, 2), (4, 3, 5), 16),  # bias_window quirk with a ragged, shifted grid
        ((2, 3, 5), (2, 3, 5), (0, 0, 0), (4, 3, 5), 8),  # the official quirk: grid smaller than the config
    ],
)
def test_ragged_and_quirk(grid, window, shift, bias_window, D):
    q, k, v, table, dout = _inputs(1, grid, 1, D, bias_window or window, torch.float32, seed=1)
    _check(q, k, v, table, dout, 1e-4, window=window, shift=shift, bias_window=bias_window)


def test_no_bias_and_head_major_strides():
    q, k, v, _, dout = _inputs(2, (2, 3, 4), 2, 16, (2, 2, 3), torch.float32, bias=False, layout="permuted",
                               seed=2)
    assert not q.is_contiguous()
    _check(q, k, v, None, dout, 1e-4, window=(2, 2, 3), shift=(0, 1, 2))


def test_multi_tile_loops(monkeypatch):
    """16-token tiles: several query and key tiles per box (online-softmax rescaling, partial last tiles)."""
    monkeypatch.setattr(tk, "BLOCK_OVERRIDE", 16)
    q, k, v, table, dout = _inputs(1, (4, 6, 5), 1, 16, (4, 3, 5), torch.float32, seed=3)
    _check(q, k, v, table, dout, 1e-4, window=(4, 3, 5), shift=(0, 1, 2))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol):
    q, k, v, table, dout = _inputs(1, (2, 6, 5), 1, 32, (2, 3, 5), dtype, seed=4)
    _check(q, k, v, table, dout, tol, window=(2, 3, 5), shift=(0, 1, 2))


def test_dbias_deterministic():
    q, k, v, table, dout = _inputs(1, (2, 4, 6), 1, 16, (2, 2, 3), torch.float32, seed=5)
    window, shift = [2, 2, 3], [0, 1, 2]
    out, lse = tk.htwa_fwd_triton(q, k, v, table, window, shift, window, 0.25)
    runs = [tk.htwa_bwd_triton(dout, q, k, v, table, out, lse, window, shift, window, 0.25)[3] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    _, _, n_chunks = tk._chunk_plan(1, (2, 4, 6), tuple(window), tuple(shift), 1, 1, True, q.device)
    assert n_chunks > 1  # the ordered chunk reduction is exercised


def test_no_bias_returns_empty_dbias():
    q, k, v, _, dout = _inputs(1, (2, 3, 5), 1, 16, (2, 3, 5), torch.float32, bias=False)
    out, lse = tk.htwa_fwd_triton(q, k, v, None, [2, 3, 5], [0, 0, 0], [2, 3, 5], 0.25)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:5]
    dbias = tk.htwa_bwd_triton(dout, q, k, v, None, out, lse, [2, 3, 5], [0, 0, 0], [2, 3, 5], 0.25)[3]
    assert dbias.numel() == 0 and dbias.dtype == torch.float32


def test_chunk_plan_is_a_single_class_partition(monkeypatch):
    """The dbias workspace ownership argument on GPU-sized plans: every (batch, box) unit exactly once, each chunk
    of one box class (so a query tile maps to the same in-window rows for all its units), workspace bounded."""
    monkeypatch.setattr(tk, "_target_programs", lambda device: 16 * 132)
    for case in official_cases():
        B, nwin = 16, case.window[0] * case.window[1] * case.window[2]
        units, ptr, n_chunks = tk._chunk_plan.__wrapped__(B, case.grid, case.window, case.shift, case.heads, 1,
                                                          True, torch.device("cpu"))
        cls = [torch.tensor(geometry.box_classes(L, w, s)) for L, w, s in zip(case.grid, case.window, case.shift)]
        nbh, nbw = len(cls[1]), len(cls[2])
        nbox = len(cls[0]) * nbh * nbw
        assert torch.equal(torch.sort(units.long()).values, torch.arange(B * nbox))
        box = units.long() % nbox
        key = (cls[0][box // (nbh * nbw)] * 9 + cls[1][(box // nbw) % nbh] * 3 + cls[2][box % nbw])
        chunk_of = torch.repeat_interleave(torch.arange(n_chunks), (ptr[1:] - ptr[:-1]).long())
        for c in range(n_chunks):
            assert key[chunk_of == c].unique().numel() == 1, (case.name, c)
        assert n_chunks * case.heads * nwin * nwin * 4 <= 64 * 2**20, case.name


def test_gpu_suite_dry_run():
    from benchmarks.gpu_htwa import run_htwa_suite

    rows = run_htwa_suite("cpu", True, cases=["layer5"])
    assert [r["case"] for r in rows] == ["layer5"]
    assert rows[0]["max_err"] < 1e-4 and rows[0]["dbias_deterministic"], rows


def test_kernels_compile_for_sm90():
    """GPU-only compile errors on a CPU machine: the full Triton pipeline plus ptxas, in a subprocess without
    TRITON_INTERPRET (`python -m tests.triton_aot`, from the repository root)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "tests.triton_aot", "90"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0 and "all kernels compiled" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_packed_qkv_gradient_written_in_place(with_bias, monkeypatch):
    """`htwa_attention_qkv` on the Triton backend: dq, dk, dv are written straight into the slices of one packed
    gradient (no stack). Output and the qkv / bias-table gradients match the fp64 reference of the unpacked op, on
    a shifted, ragged grid with two heads and D padded from 20 to 32."""
    from lfvila_kernels import htwa_attention_qkv

    kw = dict(window=(2, 3, 4), shift=(1, 1, 2), bias_window=(2, 3, 4))
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 5, 7, 9, 3, 2, 20, generator=g)
    table = torch.randn(_nbias(kw["bias_window"]), 2, generator=g) if with_bias else None
    dout = torch.randn(1, 5, 7, 9, 2, 20, generator=g)
    ref_out, ref_g, ref_db = _reference(*qkv.unbind(4), table, dout, **kw)

    seen = []
    real = tk.htwa_bwd_triton

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dqkv"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "htwa_bwd_triton", spy)
    leaf = qkv.clone().requires_grad_()
    tab = None if table is None else table.clone().requires_grad_()
    out = htwa_attention_qkv(leaf, tab, backend="triton", **kw)
    out.backward(dout)
    assert len(seen) == 1 and seen[0] is not None, "the packed backward must hand the kernels one qkv gradient"
    assert leaf.grad.shape == qkv.shape and leaf.grad.is_contiguous()
    errs = {"out": _rel(out.detach(), ref_out)}
    errs.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), leaf.grad.unbind(4), ref_g)})
    if with_bias:
        errs["dbias"] = _rel(tab.grad, ref_db)
    assert all(e <= 1e-4 for e in errs.values()), errs


_SMALL = [c for c in _CASES if c.window[0] * c.window[1] * c.window[2] <= exp.SMALL_BOX_MAX]


@pytest.mark.parametrize("case", _SMALL, ids=[c.name for c in _SMALL])
def test_small_box_one_kernel_backward(case, monkeypatch):
    """The one-kernel backward for windows of <= 64 tokens (opt-in: TUNE["small_fused"]) on the official
    layer 0/1 geometries: output and every gradient against the fp64 reference. The interpreter's chunk plan puts
    several units in a chunk, so dS is summed over units in registers before its one store."""
    monkeypatch.setitem(exp.TUNE, "small_fused", True)
    tk._chunk_plan.cache_clear()
    q, k, v, table, dout = _inputs(2, case.grid, 2, case.head_dim, case.bias_window, torch.float32)
    _check(q, k, v, table, dout, 1e-4, window=case.window, shift=case.shift, bias_window=case.bias_window)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_small_box_one_kernel_backward_ragged(bias, monkeypatch):
    """Same, on a grid ragged at both ends of every axis (several box classes), D padded 20 -> 32, the
    bias_window quirk, strides unrelated to each other (head-major storage)."""
    monkeypatch.setitem(exp.TUNE, "small_fused", True)
    tk._chunk_plan.cache_clear()
    kw = dict(window=(2, 3, 4), shift=(1, 1, 2), bias_window=(3, 3, 5))
    q, k, v, table, dout = _inputs(2, (5, 7, 9), 2, 20, kw["bias_window"], torch.float32, bias=bias,
                                   layout="heads")
    _check(q, k, v, table, dout, 1e-4, **kw)


@pytest.mark.parametrize("block", [None, 16], ids=["one-tile", "tiles16"])
def test_dbias_kernel_without_read_modify_write(block, monkeypatch):
    """The dbias workspace from its own kernel (opt-in: TUNE["dbias_kernel"]) on a ragged, shifted grid with the
    bias_window quirk: with one tile per box and with 16-token tiles (several query x key tile pairs and units
    per chunk), every gradient against the fp64 reference."""
    monkeypatch.setitem(exp.TUNE, "dbias_kernel", True)
    if block is not None:
        monkeypatch.setattr(tk, "BLOCK_OVERRIDE", block)
    tk._chunk_plan.cache_clear()
    kw = dict(window=(3, 3, 4), shift=(1, 1, 2), bias_window=(4, 3, 5))
    q, k, v, table, dout = _inputs(2, (5, 7, 9), 2, 20, kw["bias_window"], torch.float32)
    _check(q, k, v, table, dout, 1e-4, **kw)


def test_dbias_kernel_official_large_window(monkeypatch):
    """Same on the largest official window (layer 5: 480 tokens, one box class, reduced batch)."""
    monkeypatch.setitem(exp.TUNE, "dbias_kernel", True)
    tk._chunk_plan.cache_clear()
    case = next(c for c in _CASES if c.name == "layer5")
    q, k, v, table, dout = _inputs(1, case.grid, 1, case.head_dim, case.bias_window, torch.float32)
    _check(q, k, v, table, dout, 1e-4, window=case.window, shift=case.shift, bias_window=case.bias_window)


# ---- the class-tile kernels (htwa_tiles.py, the default) and the per-window kernels they replace ----

_MULTI = [c for c in _CASES if c.window[0] * c.window[1] * c.window[2] > exp.SMALL_BOX_MAX]


@pytest.mark.parametrize("case", _MULTI, ids=[c.name for c in _MULTI])
def test_official_cases_gpu_tiles(case, monkeypatch):
    """The windows of > 64 tokens (layers 2-5) with the GPU's 64-token tiles instead of the interpreter's one
    tile per box: several query x key tile pairs in the dQ, dK/dV and dS-sum kernels, the padded last tile of
    120 / 240 / 480 tokens, and (B=2) chunks of several units."""
    monkeypatch.setattr(tk, "BLOCK_OVERRIDE", 64)
    q, k, v, table, dout = _inputs(2, case.grid, 1, case.head_dim, case.bias_window, torch.float32, seed=7)
    _check(q, k, v, table, dout, 1e-4, window=case.window, shift=case.shift, bias_window=case.bias_window)


@pytest.mark.parametrize("block", [None, 16], ids=["one-tile", "tiles16"])
def test_tiles_ragged_classes(block, monkeypatch):
    """A grid ragged at both ends of every axis (3 x 2 x 3 box classes, so 18 bias tiles), the bias_window quirk,
    two heads, head-major strides: the one-kernel backward (36-token windows) and, with 16-token tiles, the
    multi-tile kernels with their dS-sum chunks."""
    if block is not None:
        monkeypatch.setattr(tk, "BLOCK_OVERRIDE", block)
    kw = dict(window=(3, 3, 4), shift=(1, 1, 2), bias_window=(4, 3, 5))
    assert len(geometry.box_class_ids((5, 7, 9), kw["window"], kw["shift"])[1]) == 18
    q, k, v, table, dout = _inputs(2, (5, 7, 9), 2, 20, kw["bias_window"], torch.float32, layout="heads", seed=8)
    _check(q, k, v, table, dout, 1e-4, **kw)


def test_bias_tiles_are_the_table_per_box():
    """Each box's tile is the table read at the bias rows of its tokens' in-window indices (spec 1.3), with 0 at
    padded queries and -inf at padded keys: checked box by box against geometry.bias_rows on a ragged, shifted
    grid with the bias_window quirk."""
    grid, window, shift, bias_window, pad = (5, 7, 9), (2, 3, 4), (1, 1, 2), (3, 3, 5), 32
    table = torch.randn(_nbias(bias_window), 2, dtype=torch.float64)
    tiles, box_cls, _ = tk._bias_tiles(table, grid, window, shift, bias_window, pad, torch.device("cpu"))
    rows = geometry.bias_rows(window, bias_window)
    boxes = [geometry.axis_boxes(L, w, s) for L, w, s in zip(grid, window, shift)]
    i = 0
    for bt in boxes[0]:
        for bh in boxes[1]:
            for bw in boxes[2]:
                n = geometry.class_window_index((bt[1], bh[1], bw[1]), (bt[2], bh[2], bw[2]), window)
                nb = n.numel()
                tile = tiles[:, int(box_cls[i])]
                want = table[rows[n[:, None], n[None, :]]].permute(2, 0, 1) * tk.LOG2E
                assert torch.equal(tile[:, :nb, :nb], want)
                assert torch.all(tile[:, :, nb:] == float("-inf")) and torch.all(tile[:, nb:, :nb] == 0)
                i += 1
    assert i == box_cls.numel()


@pytest.mark.parametrize("block", [None, 16], ids=["one-tile", "tiles16"])
def test_tiles_dbias_deterministic(block, monkeypatch):
    """dbias is the same bits on every run (the issue's target): partials summed in registers, reduced in a fixed
    order over several chunks per table row."""
    if block is not None:
        monkeypatch.setattr(tk, "BLOCK_OVERRIDE", block)
    q, k, v, table, dout = _inputs(2, (4, 6, 10), 2, 16, (4, 3, 5), torch.float32, seed=9)
    window, shift = (4, 3, 5), (0, 1, 2)
    out, lse = tk.htwa_fwd_triton(q, k, v, table, window, shift, window, 0.25)
    runs = [tk.htwa_bwd_triton(dout, q, k, v, table, out, lse, window, shift, window, 0.25)[3] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    units, ptr, chunk_cls, n = tk._unit_plan(2, (4, 6, 10), window, shift, 2, 2 * 64 * 64 * 4, q.device)
    # 9 classes, one chunk each, of 2 units: dS summed over units in registers, and each table row gathered
    # from the partials of several chunks
    assert n == len(set(chunk_cls)) == 9 and int((ptr[1:] - ptr[:-1]).min()) == 2


def test_legacy_kernels_stay_reachable(monkeypatch):
    """TUNE["legacy_kernels"] runs the per-window kernels (htwa_fwd.py, htwa_bwd.py) for the GPU A/B timing; they
    stay correct."""
    monkeypatch.setitem(exp.TUNE, "legacy_kernels", True)
    calls = []
    real = tk._legacy_bwd
    monkeypatch.setattr(tk, "_legacy_bwd", lambda *a: calls.append(1) or real(*a))
    q, k, v, table, dout = _inputs(1, (5, 7, 9), 1, 20, (2, 3, 4), torch.float32, seed=10)
    _check(q, k, v, table, dout, 1e-4, window=(2, 3, 4), shift=(1, 1, 2))
    assert calls == [1]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_one_tile_packing(bias):
    """The one-kernel backward packs 64 // block windows into one tile (block-diagonal): four 12-token windows
    per 64-row tile here, on a ragged, shifted grid whose classes hold unit counts that are not multiples of 4
    (a chunk's last step is partly empty), against the fp64 reference, dbias included."""
    kw = dict(window=(2, 2, 3), shift=(1, 1, 2), bias_window=(2, 3, 3))
    one = tk._one_tile_block(12, 32)
    assert (one, tk._one_tile_pack(one)) == (16, 4)
    units, ptr, chunk_cls, n = tk._unit_plan(3, (3, 5, 7), kw["window"], kw["shift"], 2, 2 * 64 * 64 * 4,
                                             torch.device("cpu"), 4)
    sizes = (ptr[1:] - ptr[:-1]).tolist()
    assert any(s % 4 for s in sizes) and max(sizes) > 4, sizes
    q, k, v, table, dout = _inputs(3, (3, 5, 7), 2, 16, kw["bias_window"], torch.float32, bias=bias, seed=11)
    _check(q, k, v, table, dout, 1e-4, **kw)
