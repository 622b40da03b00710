"""The limits of issue 18, measured in one call within a time budget:

    python benchmarks/gpu_limits.py [--out DIR] [--budget 240] [--only floor,loss,step,longform] [--smoke]

1. `floor`: the device's copy bandwidth, then for each of the 12 official HTWA layer cases (bf16, batch 16) the
   memory floor of one forward+backward and how close the default path ("auto": Triton on CUDA) comes to it,
   with its speed-up over the reference path and over SDPA with the bias.
2. `loss`: `info_nce_loss` at N = 65,536, D = 1,024 (bf16): the default fused path against the naive loss
   (backend "reference", which stores the N x N logits), forward+backward time and peak memory.
3. `step`: one stage-1 training step of `lfvila-official` at batch 16 (bf16 autocast), the fused ops against the
   reference attention path (`benchmarks.workloads.MODEL_VARIANTS`): step time and peak memory.
4. `longform`: the largest frame count (a multiple of 32) at which a stage-1 step at batch 4 fits in the device
   memory (at most `--memory-gib`, 80 by default: the issue's 80 GB GPU) with gradient checkpointing, fused
   against reference; one step per try.

**Copy bandwidth.** A device-to-device `copy_` of a 1 GiB buffer; bandwidth = bytes read + bytes written
(2 x 1 GiB) / the median time of several copies, in GB/s (1e9 bytes per second).

**The memory floor of an HTWA forward+backward** is the traffic no implementation can avoid: every tensor the
pair takes in or gives out crosses memory once. Counted, with X = B*T*H*W*heads*D elements of the activation
dtype (bf16: 2 bytes):
- forward: q, k, v read (3X) and o written (X);
- backward: dO read (X) and dq, dk, dv written (3X);
- the bias table (rows x heads, fp32 as the model keeps it) read once, and dbias (the same size) written once.
Not counted: re-reading q, k, v, o in the backward, the saved log-sum-exp, any workspace. So bytes =
8 X elem + 2 rows heads 4, and floor_ms = bytes / copy bandwidth. `pct_of_floor` = floor_ms / measured ms.

**Budget.** `--budget` seconds (default 240) for the whole call, shared by the sections (floor 30 %, loss 15 %,
step 25 %, longform 30 %, renormalised over the sections run; time a section leaves is the next one's). Every
measurement first checks its section's deadline; what does not fit is reported as skipped and the script still
exits cleanly. Each row is appended to `<out>/results.csv` (the GPU suite's file; schema and writer:
benchmarks/results.py) as soon as it is measured, so a run killed from outside keeps what it
had. A figure that could not be measured (out of memory, error) gets an empty value and the reason in `notes`.
A table per section prints each figure beside its target of issue 18 (met / missed).

`--smoke`: tiny shapes on the CPU (the reduced layer grids with one head at batch 1, N = 256, `lfvila-tiny` at
4 frames, frame steps of 4), every section end to end in seconds, to test the script without a GPU. Peak memory on
the CPU is the process's resident high-water mark above its level before the call (VmHWM, reset through
/proc/self/clear_refs): allocator reuse can make it 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: import the in-tree packages and `benchmarks`
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import results as results_csv  # noqa: E402

COLUMNS = tuple(results_csv.COLUMNS)
CSV_NAME = "results.csv"  # beside the GPU suite's rows: `python benchmarks/results.py add OUT/results.csv`
SECTIONS = ("floor", "loss", "step", "longform")
# each section's share of the budget (renormalised over the sections run; what one leaves goes to the next)
SHARES = {"floor": 0.30, "loss": 0.15, "step": 0.25, "longform": 0.30}

# issue 18's targets
TARGET_FLOOR_X = 3.0  # layers 0-1 within 3x of the memory floor
TARGET_VS_REFERENCE = 3.0  # HTWA fwd+bwd >= 3x the reference
TARGET_VS_SDPA = 2.0  # ... and >= 2x SDPA with the bias
TARGET_LOSS_TIME = 1.0  # info_nce <= 1.0x the naive time
TARGET_LOSS_MEMORY = 0.05  # ... with <= 5 % of its memory
TARGET_STEP_SPEEDUP = 1.5  # stage-1 step >= 1.5x the reference attention path
TARGET_STEP_MEMORY = 0.6  # ... at <= 0.6x its memory
TARGET_FRAMES_X = 4.0  # long-form row: 4x the reference's frames


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the issue's on a GPU, toy ones for `--smoke`."""

    htwa_batch: int = 16
    htwa_heads: int | None = None  # None: the official head count
    htwa_reduced: bool = False  # the reduced test grids of lfvila_kernels.shapes
    copy_bytes: int = 2**30
    loss_n: int = 65536
    loss_d: int = 1024
    loss_min_n: int = 1024  # the naive loss is tried down to this N when it runs out of memory
    preset: str = "lfvila-official"
    step_batch: int = 16
    step_frames: int = 32
    input_size: tuple = (192, 320)
    step_rounds: int = 3
    long_batch: int = 4
    frame_unit: int = 32


GPU_SIZES = Sizes()
SMOKE_SIZES = Sizes(htwa_batch=1, htwa_heads=1, htwa_reduced=True, copy_bytes=16 * 2**20, loss_n=256, loss_d=32,
                    loss_min_n=64, preset="lfvila-tiny", step_batch=2, step_frames=4, input_size=(96, 160),
                    step_rounds=1, long_batch=1, frame_unit=4)


# --------------------------------------------------------------------------------------------------------------
# budget, rows, measurement helpers


class Budget:
    """Wall-clock budget of the call, with a deadline per section: the sections' `SHARES`, renormalised over those
    that run, summed up to and including the current one (so time a section leaves goes to the next)."""

    def __init__(self, seconds: float, sections=SECTIONS):
        self.total = float(seconds)
        self.t0 = time.perf_counter()
        self.sections = [s for s in SECTIONS if s in sections]
        self.section_end = self.total

    def enter(self, section: str) -> None:
        run = self.sections[: self.sections.index(section) + 1]
        self.section_end = self.total * sum(SHARES[s] for s in run) / sum(SHARES[s] for s in self.sections)

    def left(self) -> float:
        """Seconds left in the current section."""
        return self.section_end - (time.perf_counter() - self.t0)


def _commit() -> str:
    return results_csv.git_commit(ROOT)


def _machine(dev: torch.device) -> str:
    return results_csv.machine_name(gpu=dev.type == "cuda")


class Results:
    """Rows of `COLUMNS`, each appended to the CSV (header first if the file is new) as soon as it is added."""

    def __init__(self, path: str, machine: str, commit: str):
        self.path = path
        self.machine = machine
        self.commit = commit
        self.rows: list[dict] = []

    def add(self, benchmark: str, case: str, provider: str, metric: str, value, unit: str, notes: str = ""):
        """`value` None = not measured (the reason goes in `notes`)."""
        row = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "machine": self.machine,
            "commit": self.commit, "benchmark": benchmark, "case": case, "provider": provider, "metric": metric,
            "value": "" if value is None else repr(float(value)), "unit": unit, "notes": notes,
        }
        self.rows.append(row)
        results_csv.append_rows([row], self.path)
        return value


def _median_ms(fn, dev: torch.device, left) -> float:
    """Median time of `fn` in ms: on CUDA benchmarks.gpu_htwa's CUDA-event timer (warm-up, then as many runs as
    fit in ~0.3 s and in the budget); on the CPU one warm-up call and up to 5 timed ones (fewer when `left()`
    seconds run out)."""
    if dev.type == "cuda":
        from benchmarks.gpu_htwa import _median_ms as cuda_median_ms

        return cuda_median_ms(fn, lambda: torch.cuda.synchronize(dev), left)
    fn()
    times = []
    for _ in range(5):
        if times and sum(times) / 1e3 > left():
            break
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_start(dev: torch.device) -> int | None:
    """Reset the peak-memory counter; returns the level the peak is read against (None: no counter here)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return _proc_status("VmRSS")
    except (OSError, KeyError):
        return None


def _peak_bytes(dev: torch.device, base: int | None) -> int | None:
    """Peak bytes above `base` since `_peak_start`."""
    if base is None:
        return None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    return max(0, _proc_status("VmHWM") - base)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a kernel fault poisons the context: report the rows already measured
            print(f"gpu_limits: empty_cache failed: {_short(exc)}", flush=True)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _verdict(value, target: float, higher_is_better: bool) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "missed"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, header: list[str], lines: list[list]) -> None:
    cells = [header] + [[_fmt(v) for v in line] for line in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------------------
# 1. copy bandwidth and the HTWA memory floors


def copy_bandwidth_gbs(dev: torch.device, nbytes: int, left) -> float:
    """Bytes read + written by a device-to-device copy of `nbytes` / its median time, in GB/s."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), dev, left)
    del src, dst
    _free(dev)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def htwa_floor_bytes(case, batch: int, elem_bytes: int, table_numel: int, table_elem_bytes: int = 4) -> int:
    """Bytes an HTWA forward+backward must move (module docstring): q, k, v, o, dO, dq, dk, dv once each
    (8 X elements of `elem_bytes`), the bias table read and dbias written once each."""
    x = batch * case.tokens * case.heads * case.head_dim
    return 8 * x * elem_bytes + 2 * table_numel * table_elem_bytes


def _htwa_cases(sizes: Sizes):
    from lfvila_kernels.shapes import official_cases

    cases = official_cases(reduced=sizes.htwa_reduced)
    if sizes.htwa_heads is not None:
        cases = [dataclasses.replace(c, heads=sizes.htwa_heads) for c in cases]
    return cases


def run_floor(res: Results, dev: torch.device, sizes: Sizes, budget: Budget) -> None:
    from benchmarks.gpu_htwa import _inputs
    from lfvila_kernels import htwa_attention_qkv

    bench = "limits_htwa_floor"
    if budget.left() <= 0:
        print("floor: skipped (time budget)")
        return
    bw = copy_bandwidth_gbs(dev, sizes.copy_bytes, budget.left)
    res.add(bench, f"d2d_copy_{sizes.copy_bytes}B", "torch", "copy_bandwidth", bw, "GB/s",
            "(bytes read + bytes written) / median time of a device-to-device copy_")
    print(f"copy bandwidth {bw:.1f} GB/s ({sizes.copy_bytes} B buffer)", flush=True)
    dtype = torch.bfloat16
    lines = []
    for case in _htwa_cases(sizes):
        if budget.left() < (5 if dev.type == "cuda" else 0.5):
            print(f"floor: {case.name} and later cases skipped (time budget)", flush=True)
            break
        qkv, table, dout = _inputs(case, sizes.htwa_batch, dtype, dev)
        nbytes = htwa_floor_bytes(case, sizes.htwa_batch, qkv.element_size(), table.numel(), table.element_size())
        floor_ms = nbytes / (bw * 1e9) * 1e3
        res.add(bench, case.name, "floor", "bytes_moved", nbytes, "B",
                "q,k,v,o,dO,dq,dk,dv once each + bias table read + dbias written")
        res.add(bench, case.name, "floor", "floor_ms", floor_ms, "ms", f"bytes_moved / copy bandwidth {bw:.4g} GB/s")
        kw = dict(window=case.window, shift=case.shift, bias_window=case.bias_window)
        times = {}
        for provider in ("auto", "reference", "sdpa"):
            if budget.left() <= 0:
                break
            leaf = qkv.detach().requires_grad_()
            tab = table.detach().requires_grad_()

            def fwdbwd(leaf=leaf, tab=tab, provider=provider):
                leaf.grad = None
                tab.grad = None
                htwa_attention_qkv(leaf, tab, backend=provider, **kw).backward(dout)

            note = "bf16 forward+backward, batch %d" % sizes.htwa_batch
            try:
                times[provider] = _median_ms(fwdbwd, dev, budget.left)
            except TimeoutError:
                print(f"floor: {case.name} {provider} skipped (time budget)", flush=True)
                break
            except Exception as exc:  # noqa: BLE001 - one failing path must not lose the others
                note = ("out of memory: " if _is_oom(exc) else "error: ") + _short(exc)
            res.add(bench, case.name, provider, "fwdbwd_ms", times.get(provider), "ms", note)
            leaf = tab = fwdbwd = None
            _free(dev)
        ours = times.get("auto")
        pct = vs_ref = vs_sdpa = None
        if ours:
            pct = res.add(bench, case.name, "auto", "pct_of_floor", 100 * floor_ms / ours, "%",
                          "floor_ms / fwdbwd_ms of the default path")
            if times.get("reference"):
                vs_ref = res.add(bench, case.name, "auto", "speedup_vs_reference", times["reference"] / ours, "x")
            if times.get("sdpa"):
                vs_sdpa = res.add(bench, case.name, "auto", "speedup_vs_sdpa", times["sdpa"] / ours, "x",
                                  "SDPA with the dense bias + mask on partitioned windows")
        floor_x = ours / floor_ms if ours else None
        lines.append([case.name, nbytes / 1e6, floor_ms, ours, times.get("reference"), times.get("sdpa"), pct,
                      (_verdict(floor_x, TARGET_FLOOR_X, False) if case.layer <= 1 else "(no target)"),
                      vs_ref, _verdict(vs_ref, TARGET_VS_REFERENCE, True),
                      vs_sdpa, _verdict(vs_sdpa, TARGET_VS_SDPA, True)])
        del qkv, table, dout
        _free(dev)
    print_table(f"HTWA forward+backward against its memory floor (bf16, batch {sizes.htwa_batch}, copy "
                f"{bw:.1f} GB/s)",
                ["case", "MB moved", "floor ms", "auto ms", "ref ms", "sdpa ms", "% floor",
                 f"<={TARGET_FLOOR_X:g}x floor (L0-1)", "vs ref", f">={TARGET_VS_REFERENCE:g}x", "vs sdpa",
                 f">={TARGET_VS_SDPA:g}x"], lines)


# --------------------------------------------------------------------------------------------------------------
# 2. info_nce at N = 65,536


def _measure_loss(n: int, d: int, backend: str, dev: torch.device, left) -> dict:
    """{"ms", "peak"} of a forward+backward of `info_nce_loss` (bf16), or {"note"} when it failed."""
    from benchmarks.loss_workloads import make_loss_inputs
    from lfvila_kernels import info_nce_loss

    out: dict = {}
    try:
        a, b = make_loss_inputs(n, d, torch.bfloat16, dev)

        def step():
            info_nce_loss(a, b, 0.05, backend=backend).backward()
            a.grad = None
            b.grad = None

        base = _peak_start(dev)
        step()  # the peak of one call (compilation and autotuning happen here too)
        out["peak"] = _peak_bytes(dev, base)
        out["ms"] = _median_ms(step, dev, left)
    except TimeoutError:  # benchmarks.gpu_htwa's timer: the budget is spent
        out = {"note": "skipped: time budget"}
    except Exception as exc:  # noqa: BLE001
        out = {"note": ("out of memory" if _is_oom(exc) else "error: " + _short(exc))}
    a = b = step = None  # noqa: F841 - drop the inputs (and the closure holding them) before freeing the cache
    _free(dev)
    return out


def naive_fallback(measure, n: int, min_n: int) -> tuple[int | None, dict, list]:
    """Measure the naive loss at `n`, halving N while it runs out of memory (down to `min_n`).
    Returns (the N measured or None, its result, [(N, result) of every try])."""
    tries = []
    while n >= min_n:
        r = measure(n)
        tries.append((n, r))
        if "ms" in r:
            return n, r, tries
        if r.get("note") != "out of memory":
            break
        n //= 2
    return None, tries[-1][1] if tries else {}, tries


def run_loss(res: Results, dev: torch.device, sizes: Sizes, budget: Budget) -> None:
    bench = "limits_info_nce"
    n, d = sizes.loss_n, sizes.loss_d
    lines = []

    def record(n_, provider, r, extra=""):
        case = f"N{n_}_D{d}"
        note = (r.get("note") or "bf16 forward+backward, symmetric, temperature 0.05") + extra
        res.add(bench, case, provider, "fwdbwd_ms", r.get("ms"), "ms", note)
        peak = r.get("peak")
        res.add(bench, case, provider, "peak_extra_mib", None if peak is None else peak / 2**20, "MiB",
                note if peak is not None or "note" in r else "no peak counter on this device")

    if budget.left() <= 0:
        print("loss: skipped (time budget)")
        return
    def measure(n_, backend):
        if budget.left() <= 0:
            return {"note": "skipped: time budget"}
        return _measure_loss(n_, d, backend, dev, budget.left)

    fused = measure(n, "auto")
    record(n, "auto", fused)
    naive_n, naive, tries = naive_fallback(lambda m: measure(m, "reference"), n, sizes.loss_min_n)
    for m, r in tries:
        if m != naive_n:
            record(m, "naive", r)
    if naive_n is not None:
        record(naive_n, "naive", naive, "" if naive_n == n else f"; the largest N that fits (N = {n}: out of memory)")
    fused_at = fused
    if naive_n is not None and naive_n != n:  # compare at the naive loss's largest N as well
        fused_at = measure(naive_n, "auto")
        record(naive_n, "auto", fused_at, "; at the naive loss's largest N")
    time_x = mem_x = None
    if naive_n is not None:
        case = f"N{naive_n}_D{d}"
        if fused_at.get("ms") and naive.get("ms"):
            time_x = res.add(bench, case, "auto", "time_vs_naive", fused_at["ms"] / naive["ms"], "x",
                             "fused fwdbwd_ms / naive fwdbwd_ms")
        if fused_at.get("peak") is not None and naive.get("peak"):
            mem_x = res.add(bench, case, "auto", "memory_vs_naive", fused_at["peak"] / naive["peak"], "x",
                            "fused peak extra / naive peak extra")
    mib = lambda r: None if r.get("peak") is None else r["peak"] / 2**20  # noqa: E731
    lines.append([f"N{n}", "auto", fused.get("ms"), mib(fused), fused.get("note", "")])
    for m, r in tries:
        lines.append([f"N{m}", "naive", r.get("ms"), mib(r), r.get("note", "")])
    if fused_at is not fused:
        lines.append([f"N{naive_n}", "auto", fused_at.get("ms"), mib(fused_at), fused_at.get("note", "")])
    lines.append([f"N{naive_n}" if naive_n else "-", "auto / naive", time_x, mem_x,
                  f"time <={TARGET_LOSS_TIME:g}x: {_verdict(time_x, TARGET_LOSS_TIME, False)}, memory "
                  f"<={TARGET_LOSS_MEMORY:g}x: {_verdict(mem_x, TARGET_LOSS_MEMORY, False)}"])
    print_table(f"info_nce forward+backward, bf16, D = {d}", ["N", "provider", "ms", "peak MiB", "notes"], lines)


# --------------------------------------------------------------------------------------------------------------
# 3. and 4. stage-1 steps


def _stage1(sizes: Sizes, batch: int, frames: int, variant: str, checkpointing: bool, dev: torch.device):
    """`sizes.preset` in train mode, built on `dev` (random init), and one batch of inputs there."""
    from benchmarks.workloads import MODEL_VARIANTS
    from lfvila_model import create_model

    backend, fused_blocks = MODEL_VARIANTS[variant]
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the device: a CPU init of lfvila-official takes seconds
        model = create_model(sizes.preset, video={"num_frames": frames, "attention_backend": backend,
                                                  "fused_blocks": fused_blocks},
                             text={"fused_ffn": fused_blocks}).train()
    if checkpointing:
        model.set_gradient_checkpointing(True)
    cfg = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    video = torch.randn(batch, 3, frames, *sizes.input_size, generator=g, device=dev)
    ids = torch.randint(1000, 20000, (batch, cfg.num_sentences, cfg.max_sentence_len), generator=g, device=dev)
    return model, video, ids, torch.ones_like(ids)


def run_step(res: Results, dev: torch.device, sizes: Sizes, budget: Budget) -> None:
    from benchmarks.gpu_model import _time_step

    bench = "limits_stage1_step"
    case = f"{sizes.preset}_batch{sizes.step_batch}_frames{sizes.step_frames}"
    got = {}
    for variant in ("auto", "reference"):
        if budget.left() < (20 if dev.type == "cuda" else 1):
            print(f"step: {variant} skipped (time budget)", flush=True)
            continue
        note = ("bf16 autocast; " if dev.type == "cuda" else "") + f"median of {sizes.step_rounds} steps"
        r = {}
        try:
            model, video, ids, mask = _stage1(sizes, sizes.step_batch, sizes.step_frames, variant, False, dev)
            base = _peak_start(dev)
            r["ms"] = statistics.median(_time_step(model, video, ids, mask, dev.type, sizes.step_rounds))
            r["peak"] = _peak_bytes(dev, base)
        except Exception as exc:  # noqa: BLE001
            note = ("out of memory: " if _is_oom(exc) else "error: ") + _short(exc)
            r = {}
        model = video = ids = mask = None  # noqa: F841
        _free(dev)
        got[variant] = r
        res.add(bench, case, variant, "step_ms", r.get("ms"), "ms", note)
        peak = r.get("peak")
        res.add(bench, case, variant, "peak_extra_gib", None if peak is None else peak / 2**30, "GiB",
                note if peak is not None or not r else "no peak counter on this device")
    fused, ref = got.get("auto", {}), got.get("reference", {})
    speed = mem = None
    if fused.get("ms") and ref.get("ms"):
        speed = res.add(bench, case, "auto", "speedup_vs_reference", ref["ms"] / fused["ms"], "x",
                        "reference step_ms / fused step_ms")
    if fused.get("peak") is not None and ref.get("peak"):
        mem = res.add(bench, case, "auto", "memory_vs_reference", fused["peak"] / ref["peak"], "x",
                      "fused peak extra / reference peak extra")
    gib = lambda r: None if r.get("peak") is None else r["peak"] / 2**30  # noqa: E731
    print_table(f"stage-1 step, {case}",
                ["variant", "step ms", "peak extra GiB", "speed-up", f">={TARGET_STEP_SPEEDUP:g}x", "memory",
                 f"<={TARGET_STEP_MEMORY:g}x"],
                [["reference", ref.get("ms"), gib(ref), None, "", None, ""],
                 ["auto (fused)", fused.get("ms"), gib(fused), speed, _verdict(speed, TARGET_STEP_SPEEDUP, True), mem,
                  _verdict(mem, TARGET_STEP_MEMORY, False)]])


def largest_fit(try_frames, unit: int, max_frames: int | None = None, cap_bytes: int | None = None,
                enough_time=lambda frames: True) -> dict:
    """The largest multiple of `unit` for which `try_frames(frames)` fits.

    try_frames(frames) -> {"fits": bool, "peak": bytes or None, "note": str}; a try that neither fits nor ran
    out of memory ("oom": False) stops the search (an error is not a memory limit). Search: `unit`, 2 `unit`,
    then, while nothing has failed, the frame count where the line through the last two fitting peaks reaches
    97 % of `cap_bytes` (100 % once the largest fit is past that; doubling where there is no peak), at least one
    `unit` and at most 8x further; after a failure the line's frame count at the cap where it lies strictly
    between the largest fit and the smallest failure, else their midpoint, until they are one `unit` apart.
    `max_frames` bounds the search; `enough_time(frames)` is asked before each try. Returns {"frames": the
    largest fit or None, "tries": [(frames, result)], "stop": why it ended, "exact": whether the next multiple
    was seen to fail}.
    """
    lo = hi = None
    fits: list[tuple[int, int | None]] = []
    tries = []

    def guess(share):
        """Where the line through the last two fitting peaks reaches `share` of the cap (None: no line)."""
        if not cap_bytes or len(fits) < 2 or not fits[-1][1] or not fits[-2][1]:
            return None
        (f1, p1), (f2, p2) = fits[-2], fits[-1]
        slope = (p2 - p1) / (f2 - f1)
        return int(f2 + (share * cap_bytes - p2) / slope) // unit * unit if slope > 0 else None

    f = unit
    stop = "bracketed"
    while True:
        if max_frames is not None and f > max_frames:
            stop = f"search cap {max_frames} frames"
            break
        if not enough_time(f):
            stop = "time budget"
            break
        r = try_frames(f)
        tries.append((f, r))
        if r["fits"]:
            lo = f
            fits.append((f, r.get("peak")))
        elif r.get("oom", True):
            hi = f
        else:
            stop = f"error at {f} frames"
            break
        if lo is None:
            stop = f"{f} frames do not fit"
            break
        if hi is not None and hi - lo <= unit:
            break
        if hi is None:
            g = guess(0.97)  # a margin for the allocator's fragmentation; once past it, the line at the cap
            if g is not None and g <= lo:
                g = guess(1.0)
            # at most 8x the largest fit: a nearly flat line must not send one try to the moon
            f = min(max(lo + unit, g if g is not None else 2 * lo), 8 * lo)
        else:
            g = guess(1.0)
            f = g if g is not None and lo < g < hi else (lo + hi) // 2 // unit * unit
            f = min(max(f, lo + unit), hi - unit)
        if max_frames is not None and lo < max_frames // unit * unit < f:
            f = max_frames // unit * unit  # the cap itself before stopping there
    return {"frames": lo, "tries": tries, "stop": stop, "exact": hi is not None and lo is not None and hi - lo <= unit}


def run_longform(res: Results, dev: torch.device, sizes: Sizes, budget: Budget, memory_gib: float,
                 max_frames: int | None) -> None:
    from benchmarks.gpu_model import _time_step

    bench = "limits_longform"
    cap = None
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        cap = min(total, int(memory_gib * 2**30))
        if cap < total:  # a larger card (H200) is held to the 80 GB
            torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    cap_note = f"memory cap {cap / 2**30:.1f} GiB" if cap else "no memory cap on this device"
    results = {}
    try:
        # the reference first: a failing fused kernel at an extreme size cannot then cost the reference's row
        for variant in ("reference", "auto"):
            last = {}  # the last fitting try: frames, build and step seconds

            def enough_time(frames, last=last):
                if not last:
                    return budget.left() > (30 if dev.type == "cuda" else 1)
                # the build is about constant, the step grows with the frames (x1.5 for an out-of-memory's
                # cleanup and the estimate's slack)
                need = 3 + last["build_s"] + 1.5 * last["step_s"] * frames / last["frames"]
                return budget.left() > need

            def try_frames(frames, variant=variant, last=last):
                r = {"fits": False, "oom": True, "peak": None, "note": ""}
                t0 = time.perf_counter()
                t_built = None
                try:
                    # CUDA: the total peak (model, inputs and the step: what has to fit); CPU: the resident
                    # high-water mark above the level before the build
                    base = 0 if dev.type == "cuda" else _peak_start(dev)
                    model, video, ids, mask = _stage1(sizes, sizes.long_batch, frames, variant, True, dev)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    t_built = time.perf_counter()
                    _time_step(model, video, ids, mask, dev.type, 0)  # one step (its "warm-up")
                    r["peak"] = _peak_bytes(dev, base)
                    r["fits"] = True
                    r["note"] = "fits"
                except Exception as exc:  # noqa: BLE001 - leave the except block before freeing (traceback)
                    r["oom"] = _is_oom(exc)
                    r["note"] = "out of memory" if r["oom"] else "error: " + _short(exc)
                model = video = ids = mask = None  # noqa: F841
                _free(dev)
                t_end = time.perf_counter()
                if r["fits"]:
                    last.update(frames=frames, build_s=t_built - t0, step_s=t_end - t_built)
                peak = r["peak"]
                what = "peak allocated" if dev.type == "cuda" else "peak resident set above the level before"
                res.add(bench, f"batch{sizes.long_batch}_frames{frames}", variant, "step_peak_gib",
                        None if peak is None else peak / 2**30, "GiB",
                        f"{r['note']}; {what}; one step with gradient checkpointing ({t_end - t0:.1f} s with the "
                        f"build); {cap_note}")
                print(f"longform {variant} {frames} frames: {r['note']} "
                      f"(peak {_fmt(None if peak is None else peak / 2**30)} GiB, {t_end - t0:.1f} s)", flush=True)
                return r

            out = largest_fit(try_frames, sizes.frame_unit, max_frames, cap, enough_time)
            results[variant] = out
            if out["frames"] is not None:
                bound = "" if out["exact"] else f"; a lower bound (search ended: {out['stop']})"
                res.add(bench, f"batch{sizes.long_batch}", variant, "max_frames", out["frames"], "frames",
                        f"largest multiple of {sizes.frame_unit} that fits, gradient checkpointing{bound}; {cap_note}")
    finally:
        if cap is not None:
            try:
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
            except RuntimeError:  # a poisoned context (see _free); nothing runs on this device after this section
                pass
    ref, ours = results.get("reference", {}), results.get("auto", {})
    ratio = None
    if ref.get("frames") and ours.get("frames"):
        ratio = res.add(bench, f"batch{sizes.long_batch}", "auto", "frames_vs_reference",
                        ours["frames"] / ref["frames"], "x",
                        "fused max_frames / reference max_frames" + ("" if ours["exact"] and ref["exact"]
                                                                     else " (from a lower bound)"))
    lines = [[v, results.get(k, {}).get("frames"), "yes" if results.get(k, {}).get("exact") else "no",
              results.get(k, {}).get("stop", "not run")] for k, v in (("reference", "reference"), ("auto", "auto"))]
    lines.append(["auto / reference", ratio, "", f">={TARGET_FRAMES_X:g}x: {_verdict(ratio, TARGET_FRAMES_X, True)}"])
    print_table(f"long-form row: stage-1 step at batch {sizes.long_batch}, gradient checkpointing, {cap_note}",
                ["variant", "max frames", "exact", "search ended"], lines)


# --------------------------------------------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help=f"folder of {CSV_NAME} (default $OUT or .)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole call (default 240)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--memory-gib", type=float, default=80.0,
                   help="long-form row: device memory a step may use (default 80: the issue's 80 GB GPU)")
    p.add_argument("--max-frames", type=int, default=None, help="long-form row: the largest frame count to try")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, every section in seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"gpu_limits: unknown sections {unknown}; choose from {SECTIONS}")
    if args.smoke:
        dev, sizes = torch.device("cpu"), SMOKE_SIZES
        max_frames = args.max_frames or 2 * sizes.frame_unit
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_limits: no CUDA device; use --smoke to run the script on the CPU")
        dev, sizes, max_frames = torch.device("cuda", torch.cuda.current_device()), GPU_SIZES, args.max_frames
    os.makedirs(args.out, exist_ok=True)
    res = Results(os.path.join(args.out, CSV_NAME), _machine(dev), _commit())
    budget = Budget(args.budget, sections)
    print(f"gpu_limits: {res.machine}, torch {torch.__version__}, commit {res.commit}, budget {args.budget:g} s, "
          f"sections {sections}{' (smoke)' if args.smoke else ''}", flush=True)
    runners = {
        "floor": lambda: run_floor(res, dev, sizes, budget),
        "loss": lambda: run_loss(res, dev, sizes, budget),
        "step": lambda: run_step(res, dev, sizes, budget),
        "longform": lambda: run_longform(res, dev, sizes, budget, args.memory_gib, max_frames),
    }
    failures = 0
    for section in SECTIONS:
        if section not in sections:
            continue
        budget.enter(section)
        t0 = time.perf_counter()
        try:
            runners[section]()
        except Exception as exc:  # noqa: BLE001 - the other sections' figures are worth keeping
            failures += 1
            print(f"gpu_limits: section {section} failed: {_short(exc)}", flush=True)
            import traceback

            traceback.print_exc()
        _free(dev)
        print(f"-- {section}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\ngpu_limits: {len(res.rows)} rows appended to {res.path} "
          f"({time.perf_counter() - budget.t0:.1f} s of {args.budget:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
