"""Peak extra memory of one call, measured in a fresh subprocess.

The child builds the inputs, records its resident set (VmRSS), resets the kernel's peak counter
(`/proc/self/clear_refs` <- 5 resets VmHWM), runs the workload once, and reports VmHWM - baseline. A fresh process
per case keeps allocator caches and earlier cases out of the number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import gc, json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from benchmarks.workloads import build

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
run = build({spec!r})
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
run()
peak = status("VmHWM")
print(json.dumps({{"peak_extra_bytes": peak - base}}))
"""


def peak_extra_bytes(spec: dict, threads: int | None = None, timeout: float = 900, repeats: int = 1,
                     samples: list | None = None) -> int | None:
    """Peak extra resident memory (bytes) of `benchmarks.workloads.build(spec)()`; None where unmeasurable.

    With repeats > 1 the median over that many fresh processes (each value appended to `samples` when given): one
    process's peak can sit far from the typical one (the reference attention's layer-0 peak ranged 186-260 MiB over
    five processes on the 2-core VM, as glibc happened to reuse or return freed blocks)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    values = sorted(_probe(spec, threads, timeout) for _ in range(max(1, repeats)))
    if samples is not None:
        samples.extend(values)
    return values[len(values) // 2]


def _probe(spec: dict, threads: int | None, timeout: float) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _CHILD.format(root=root, spec=spec, threads=threads or os.cpu_count() or 1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
