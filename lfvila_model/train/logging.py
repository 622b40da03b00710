"""Metric logging for training and evaluation: a JSONL file (one object per record) and TensorBoard event files
(`torch.utils.tensorboard.SummaryWriter`), on the main rank only. TensorBoard is optional: without the
`tensorboard` package the JSONL log is still written (and a warning says why the events are missing)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping, Optional

__all__ = ["MetricLogger", "get_logger", "add_run_log_file", "remove_run_log_file"]

RUN_LOG_NAME = "train.log"
_LOGGERS = ("lfvila.train", "lfvila_model")


def get_logger() -> logging.Logger:
    log = logging.getLogger("lfvila.train")
    if not logging.getLogger().handlers and not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    return log


def add_run_log_file(out_dir: str) -> logging.FileHandler:
    """Append everything the trainer and the model log, debug details included (e.g. the full list of tensors a
    weight init left new), to `<out_dir>/train.log`; the console keeps its INFO summaries."""
    get_logger()
    os.makedirs(out_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(out_dir, RUN_LOG_NAME))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        for h in log.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(logging.INFO)  # the console stays at INFO
    return handler


def remove_run_log_file(handler: Optional[logging.FileHandler]) -> None:
    if handler is None:
        return
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricLogger:
    """`log(step, {name: value}, prefix)` appends `{"step", "time", "<prefix>/<name>": value}` to
    `<out_dir>/metrics.jsonl` and adds scalars to the event files under `<out_dir>/tensorboard`.

    Args:
        out_dir: run directory (created).
        enabled: False on non-main ranks (nothing is written).
        tensorboard: write event files too.
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writer = None
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge_step)
            except ImportError as e:  # tensorboard not installed
                get_logger().warning("TensorBoard event files disabled: %s", e)
        if purge_step is not None and os.path.isfile(self.path):
            # a resumed run rewrites the steps after its checkpoint: drop them from the JSONL too
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= purge_step]
            with open(self.path, "w") as f:
                f.writelines(keep)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            v = _plain(v)
            name = f"{prefix}/{k}" if prefix else k
            rec[name] = v
            if self.writer is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(name, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
