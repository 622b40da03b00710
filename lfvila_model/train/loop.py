"""The training loop: one `Trainer` for pre-training (stage 1 and 2), fine-tuning and the demo.

What a step does is a `Task` (`lfvila_model.train.tasks`): `task.loss(model, batch, gen)` returns a dict with
`loss` and the per-term values. The trainer owns everything else:

- AdamW with the official groups and a per-iteration schedule (`optim.py`);
- gradient accumulation (`grad_accum` micro-batches per update, DDP `no_sync` on all but the last), gradient
  clipping (global L2 norm), mixed precision on GPU (bf16 autocast, or fp16 autocast with a `GradScaler`),
  gradient checkpointing (the model's `set_gradient_checkpointing`);
- DDP under `torchrun` (gloo on CPU, NCCL on GPU), or with `strategy: fsdp` FSDP2 sharding and distributed
  checkpoints (`fsdp.py`: precision through FSDP's mixed-precision policy instead of autocast); batches from
  `EpochBatches` (the same global batches for any world size) and MTC indices from a per-step generator (the same
  on every rank);
- input from DataLoader workers (`lfvila_model.data.loader.TrainInput`: `num_workers` processes, `prefetch`
  batches ahead each; the same batches for any worker count), with the time each step waited for its batch logged
  as `data_seconds` and `data_fraction` (and a warning when input is the bottleneck);
- a wall-clock budget (`max_minutes`; every rank stops at the same step); with `fit_schedule_to_budget` the
  schedule's total is fitted to the budget from the measured speed of the first steps (then frozen, and saved);
- checkpoints (`checkpointing.py`) every `ckpt_every` updates and at the end, `resume` continuing exactly;
- tqdm progress, metrics to `metrics.jsonl` and TensorBoard (`logging.py`), periodic evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data.loader import TrainInput, sync_skips
from .checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .distributed import DistInfo, EpochBatches, barrier, gather_objects, is_distributed, mtc_generator
from .fsdp import (check_checkpoint_strategy, gather_unsharded, grad_norm_value, load_fsdp_checkpoint,
                   plain_class, save_fsdp_checkpoint, shard_model)
from .logging import MetricLogger, get_logger
from .optim import LRSchedule, Scheduler, build_optimizer
from .runconfig import TrainConfig

__all__ = ["Trainer", "metric_value"]

# a step that waits for its batch longer than this fraction of its time is input-bound (warned about)
DATA_FRACTION_WARN = 0.3

def metric_value(metrics: dict, name: str) -> float:
    """The number at `name` in an evaluation's metrics, a dotted path for nested ones (`t2v.R@1`)."""
    cur = metrics
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(f"train.best_metric {name!r} is not among the evaluation's metrics "
                           f"{sorted(_metric_names(metrics))}")
        cur = cur[part]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)):
        raise TypeError(f"train.best_metric {name!r} must name a number, got {type(cur).__name__}")
    return float(cur)


def _metric_names(metrics: dict, prefix: str = "") -> list:
    out = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            out += _metric_names(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{prefix}{k}")
    return out


class Trainer:
    """Runs a task on a model.

    Args:
        model: the (unwrapped) model; moved to the device, wrapped in DDP when distributed.
        task: `lfvila_model.train.tasks.Task` (loss of a batch; batch assembly).
        train_data: the training set (a dataset of `lfvila_model.data`, or an in-memory set with `get_batch`).
        cfg: `TrainConfig`.
        dist_info: `DistInfo` from `init_distributed` (default: one CPU/GPU process).
        evaluate: optional `evaluate(model, step) -> dict of metrics`, called on rank 0 (unwrapped model, eval
            mode, no grad) every `eval_every` updates and at the end; under `strategy: fsdp` the model is an
            unsharded copy that rank 0 gathers the full weights into.
        run_config: the whole run's config, saved beside the checkpoints (`run_config.json`).
        num_workers: DataLoader worker processes building the training batches (`data.num_workers`; 0: in this
            process); prefetch: batches each worker prepares ahead (`data.prefetch`).
    """

    def __init__(self, model: nn.Module, task, train_data, cfg: TrainConfig, dist_info: Optional[DistInfo] = None,
                 evaluate: Optional[Callable[[nn.Module, int], dict]] = None, run_config: Optional[dict] = None,
                 num_workers: int = 0, prefetch: int = 2):
        self.cfg = cfg
        self.task = task
        self.data = train_data
        self.evaluate_fn = evaluate
        self.run_config = run_config or {}
        self.log = get_logger()
        if dist_info is None:
            dev = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
            dist_info = DistInfo(device=torch.device(dev))
        self.dist = dist_info
        self.device = dist_info.device
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a GPU (use bf16 or fp32 on the CPU)")
        self.fsdp = cfg.strategy == "fsdp"
        self.model_cls = plain_class(model)  # evaluation under fsdp rebuilds a plain copy of this class
        # fsdp: sharded where it is, each unit moved to the device as it is sharded
        self.model = shard_model(model, self.device, cfg.precision) if self.fsdp else model.to(self.device)
        if cfg.grad_checkpointing:
            model.set_gradient_checkpointing(True)
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.include_pooler,
                                         cfg.lr_scale)
        self.batches = EpochBatches(len(train_data), cfg.batch_size, dist_info.rank, dist_info.world_size,
                                    shuffle=True, seed=cfg.seed, drop_last=True,
                                    groups=getattr(train_data, "groups", None))
        self.steps_per_epoch = len(self.batches) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"one epoch ({len(self.batches)} batches) holds fewer than grad_accum="
                             f"{cfg.grad_accum} batches")
        task.data_size = len(train_data)
        self.input = TrainInput(train_data, task, self.batches, self.steps_per_epoch * cfg.grad_accum, self.device,
                                num_workers=num_workers, prefetch=prefetch, seed=cfg.seed)
        total = cfg.max_steps or max(1, int(round(cfg.epochs * self.steps_per_epoch)))
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.schedule = LRSchedule(cfg.schedule, total_steps=total, warmup_steps=min(warm, total),
                                   lr_min_rate=cfg.lr_min_rate,
                                   step_size=max(1, int(round(cfg.step_size_epochs * self.steps_per_epoch))),
                                   gamma=cfg.gamma, min_lr=cfg.min_lr, base_lr=cfg.lr)
        self.scheduler = Scheduler(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.ddp = None
        if is_distributed() and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # stage 1 leaves heads (MLM, VTM, local_feat_proj with MTC on final features) without gradients
            self.ddp = DDP(model, device_ids=ids, find_unused_parameters=True)
        self.step = 0
        self.train_seconds = 0.0
        self.schedule_fitted = False
        self.best: Optional[dict] = None  # {"step", "metric", "value"} of the best evaluation so far
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
        self.best_dir = os.path.join(cfg.out_dir, "best")

    # -- helpers ------------------------------------------------------------------------------------------------

    @property
    def net(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _step_precision(self):
        # under fsdp the mixed-precision policy casts parameters and inputs per sharded module
        return contextlib.nullcontext() if self.fsdp else self._autocast()

    def _state(self) -> dict:
        state = {"step": self.step, "train_seconds": self.train_seconds, "total_steps": self.schedule.total_steps,
                 "schedule_fitted": self.schedule_fitted, "best": self.best}
        stream = self.input.stream_state()  # shard streams: every rank's position, saved by rank 0
        if stream is not None:
            state["stream"] = gather_objects(stream)
        return state

    def save(self, final: bool = False) -> str:
        """Write a checkpoint of this step (every rank calls it). `final`: the run's last one; under fsdp it also
        holds the full weights (`config.json` + `model.safetensors`, as every DDP checkpoint does)."""
        if self.fsdp:
            path = save_fsdp_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                                        self.scaler, state=self._state(), keep_last=self.cfg.keep_last,
                                        full_weights=self.model_cls if final else None)
            if self.dist.is_main:
                self.log.info("checkpoint %s", path)
            return path
        path = save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                               state=self._state(), keep_last=self.cfg.keep_last, rank=self.dist.rank,
                               world_size=self.dist.world_size, barrier=barrier)
        if self.dist.is_main:
            self.log.info("checkpoint %s", path)
        return path

    def resume(self, path: Optional[str] = None) -> bool:
        """Load `path` (or the latest checkpoint of `out_dir`); returns False when there is none."""
        path = path or latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        check_checkpoint_strategy(path, self.cfg.strategy)
        if self.fsdp:
            trainer = load_fsdp_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler)
        else:
            trainer = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler,
                                      rank=self.dist.rank)
        st = trainer["state"]
        self.step = int(st["step"])
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.schedule.total_steps = int(st.get("total_steps", self.schedule.total_steps))
        self.schedule_fitted = bool(st.get("schedule_fitted", False))
        self.best = st.get("best")
        streams = st.get("stream")
        if streams is not None:
            self.input.load_stream_state(streams[self.dist.rank] if len(streams) == self.dist.world_size
                                         else {"lanes": None})  # another world size: restarts the lanes
        self.scheduler.load_state_dict(trainer["scheduler"])
        if self.dist.is_main:
            self.log.info("resumed from %s at step %d", path, self.step)
        return True

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on rank 0 (the budget clock of rank 0 decides)."""
        if not is_distributed():
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    def _fit_schedule(self, seconds_per_step: float) -> None:
        budget = self.cfg.max_minutes * 60.0
        left = max(budget - self.train_seconds, 0.0)
        total = self.step + max(1, int(left / seconds_per_step * 0.97))
        t = torch.tensor([float(total)])
        if is_distributed():
            torch.distributed.broadcast(t, 0)
        self.schedule.total_steps = max(int(t.item()), self.step + 1)
        self.schedule.warmup_steps = min(self.schedule.warmup_steps, self.schedule.total_steps)
        self.schedule_fitted = True
        if self.dist.is_main:
            self.log.info("schedule fitted to the budget: %d updates (%.3f s each)", self.schedule.total_steps,
                          seconds_per_step)

    def run_eval(self, metrics_logger: Optional[MetricLogger] = None) -> dict:
        out = {}
        model = self.model
        if self.fsdp and self.evaluate_fn is not None:  # every rank takes part in the gather
            model = gather_unsharded(self.model, self.model_cls)
        if self.evaluate_fn is not None and self.dist.is_main:
            was = model.training
            model.eval()
            with torch.no_grad(), self._autocast():
                out = self.evaluate_fn(model, self.step) or {}
            model.train(was)
            if self.cfg.best_metric:
                self._keep_if_best(out, model)
            if metrics_logger is not None and out:
                metrics_logger.log(self.step, {k: v for k, v in out.items() if isinstance(v, (int, float))}, "eval")
        barrier()
        return out

    def _keep_if_best(self, metrics: dict, model: nn.Module) -> None:
        name = self.cfg.best_metric
        value = metric_value(metrics, name)
        better = self.best is None or (value > self.best["value"] if self.cfg.best_mode == "max"
                                       else value < self.best["value"])
        if not better:
            return
        from ..weights import atomic_write_bytes, save_pretrained

        save_pretrained(model, self.best_dir)
        self.best = {"step": self.step, "metric": name, "value": value}
        atomic_write_bytes(os.path.join(self.best_dir, "best.json"), (json.dumps(self.best, indent=2) + "\n").encode())
        self.log.info("best %s so far: %.4g at step %d (weights in %s)", name, value, self.step, self.best_dir)

    # -- the loop -----------------------------------------------------------------------------------------------

    def fit(self, resume: bool | str = False, stop_at: Optional[int] = None) -> dict:
        """Train until the schedule's total, `max_steps` or the time budget (or, for an interruption that keeps
        the schedule, until update `stop_at`). Returns a summary dict."""
        cfg = self.cfg
        if resume:
            self.resume(resume if isinstance(resume, str) else None)
        elif self.step == 0 and list_checkpoints(self.ckpt_dir):
            raise FileExistsError(f"{self.ckpt_dir} already holds checkpoints: pass resume=True (--resume) to continue "
                                  f"that run, or choose another out_dir")
        if self.dist.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "run_config.json"), "w") as f:
                json.dump(self.run_config, f, indent=2, default=str)
        mlog = MetricLogger(cfg.out_dir, enabled=self.dist.is_main, tensorboard=cfg.tensorboard,
                            purge_step=self.step)
        self.model.train()
        accum = cfg.grad_accum
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.schedule.total_steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True)
        sums: dict = {}
        n_logged = 0
        data_wait = step_time = 0.0  # seconds waited for batches / taken by steps, this logging interval
        slow_input = 0  # consecutive logging intervals over DATA_FRACTION_WARN
        interval_t0 = time.perf_counter()
        stop_reason = "schedule"
        epoch = self.step // self.steps_per_epoch
        start_batch = (self.step % self.steps_per_epoch) * accum
        last_eval: dict = {}
        last_lr = self.optimizer.param_groups[0]["lr"]

        def flush(lr):
            nonlocal sums, n_logged, interval_t0, data_wait, step_time, slow_input
            if not n_logged:
                return
            el = time.perf_counter() - interval_t0
            rec = {k: v / n_logged for k, v in sums.items()}
            fraction = data_wait / step_time if step_time > 0 else 0.0
            rec.update(lr=lr, epoch=self.step / self.steps_per_epoch, seconds_per_step=el / n_logged,
                       samples_per_second=n_logged * accum * cfg.batch_size * self.dist.world_size / el,
                       train_minutes=self.train_seconds / 60.0, data_seconds=data_wait / n_logged,
                       data_fraction=fraction, skipped_videos=sync_skips(self.task.tracker))
            mlog.log(self.step, rec)
            # the first interval includes the workers' start-up; warn once input stays the bottleneck
            slow_input = slow_input + 1 if fraction > DATA_FRACTION_WARN else 0
            if slow_input == 2 and self.dist.is_main:
                self.log.warning(
                    "steps wait for input %.0f%% of their time (%.2f s per step): the GPU idles. Raise "
                    "data.num_workers (now %d) if CPU cores are free, or train on smaller clips (360p instead of "
                    "720p; see docs/data-loading.md)", 100 * fraction, data_wait / n_logged, self.input.num_workers)
            sums, n_logged, interval_t0, data_wait, step_time = {}, 0, time.perf_counter(), 0.0, 0.0

        # one stream of batches for the whole run: workers keep preparing across epoch boundaries
        it = self.input.start(epoch, start_batch)
        while self.step < self.schedule.total_steps:
            out_of_time = False
            for _ in range(self.steps_per_epoch - (self.step % self.steps_per_epoch)):
                if self.step >= self.schedule.total_steps:
                    break
                if stop_at is not None and self.step >= stop_at:
                    out_of_time = True
                    stop_reason = "stop_at"
                    break
                t0 = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(accum):
                    tw = time.perf_counter()
                    batch = next(it)
                    data_wait += time.perf_counter() - tw
                    gen = mtc_generator(cfg.seed, self.step * accum + micro)
                    sync = micro == accum - 1 or self.ddp is None
                    ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                    if self.fsdp and accum > 1:  # reduce-scatter the gradients on the last micro-batch only
                        self.model.set_requires_gradient_sync(micro == accum - 1)
                    with ctx:
                        with self._step_precision():
                            out = self.task.loss(self.net, batch, gen)
                        loss = out["loss"] / accum
                        if not torch.isfinite(loss.detach()):
                            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
                        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                    for k, v in out.items():
                        if torch.is_tensor(v) and v.ndim == 0:
                            sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                gnorm = None
                if cfg.clip_grad is not None:
                    gnorm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
                lr = max(g["lr"] for g in self.optimizer.param_groups)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                step_time += dt
                n_logged += 1
                if gnorm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}", lr=f"{lr:.2e}",
                                    data=f"{data_wait / step_time:.0%}")
                last_lr = lr
                if self.step % cfg.log_every == 0 or self.step == self.schedule.total_steps:
                    flush(lr)
                if cfg.max_minutes is not None:
                    if cfg.fit_schedule_to_budget and not self.schedule_fitted and self.step >= 10:
                        self._fit_schedule(self.train_seconds / self.step)
                        if bar is not None:
                            bar.total = self.schedule.total_steps
                            bar.refresh()
                    if self._agree(self.train_seconds >= cfg.max_minutes * 60.0):
                        out_of_time = True
                        stop_reason = "time budget"
                        break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.schedule.total_steps:
                    last_eval = self.run_eval(mlog)
            if out_of_time:
                break
            epoch += 1
        flush(last_lr)
        self.input.close()
        if bar is not None:
            bar.close()
        if self.fsdp or not (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
            self.save(final=True)  # fsdp: again at a step ckpt_every saved, now with the full weights
        last_eval = self.run_eval(mlog) if self.evaluate_fn is not None else last_eval
        mlog.close()
        summary = {"steps": self.step, "train_minutes": self.train_seconds / 60.0, "stop_reason": stop_reason,
                   "total_steps": self.schedule.total_steps, "eval": last_eval}
        if self.cfg.best_metric:
            summary["best"] = self.best
        return summary
