"""Loss workloads shared by the CPU loss benchmarks, their memory probe and the GPU suite: `build_loss(spec)` returns
a no-argument callable running one forward + backward of `info_nce_loss`. A spec is a plain dict, so it crosses
process boundaries (the memory probe runs it in a fresh interpreter).

Inputs: a, b `(N, D)` L2-normalised random features (as LF-VILA's projected, normalised v and p), temperature
0.05 (the official VPC value), symmetric loss; `backend="reference"` is the naive path that materialises the
N x N logits, the others the fused kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_spec(n: int, d: int, backend: str, dtype: str = "float32", device: str = "cpu") -> dict:
    return {"op": "info_nce", "n": n, "d": d, "backend": backend, "dtype": dtype, "device": device}


def make_loss_inputs(n: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    return a, b


def build_loss(spec: dict):
    from lfvila_kernels import info_nce_loss

    a, b = make_loss_inputs(spec["n"], spec["d"], getattr(torch, spec["dtype"]), spec["device"])

    def run():
        loss = info_nce_loss(a, b, 0.05, backend=spec["backend"])
        loss.backward()
        a.grad = None
        b.grad = None
        return loss

    return run


_CHILD = r"""
import gc, json, resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from benchmarks.loss_workloads import build_loss

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None

run = build_loss({spec!r})
gc.collect()
base = status("VmRSS")
try:  # reset the peak (VmHWM) to the current RSS so imports and input creation do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
run()
if reset:
    peak = status("VmHWM")
else:  # ru_maxrss (KiB) is the lifetime peak: a lower bound of the workload's own peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak_extra_bytes": peak - base, "hwm_reset": reset}}))
"""


def peak_extra_bytes(spec: dict, threads: int | None = None, timeout: float = 900) -> int:
    """Peak extra resident memory (bytes) of one `build_loss(spec)()` call, measured in a fresh subprocess: RSS
    after building the inputs vs the peak RSS during the call."""
    code = _CHILD.format(root=ROOT, spec=spec, threads=threads or os.cpu_count() or 1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
