"""Run configuration: YAML files with `--set key=value` overrides (dotted keys, YAML-typed values).

A run YAML has these sections (all optional; `configs/train_*.yaml` and `configs/demo.yaml` are examples):

    base: other.yaml        # a YAML this one extends (path relative to this file); sections are deep-merged
    model:
      preset: lfvila-demo   # a preset name (lfvila_model.presets) ...
      config: null          # ... or a model YAML/JSON (configs/lfvila_*.yaml); `changes` are applied on top
      changes: {}           # LFVILAConfig fields, e.g. {mtc_weight: 0.0, video: {drop_path_rate: 0.1}}
      init: {checkpoint: null, swin: null, bert: null}   # weights: own dir / official .bin, Swin-B, BERT dir
    loss: {}                # shorthand for model.changes of the loss fields (mtc_weight, temperature, ...)
    data: {...}             # DataConfig (below)
    train: {...}            # TrainConfig (below)
    eval: {...}             # EvalConfig (below)
    demo: {...}             # DemoConfig (below)
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Optional

__all__ = ["TrainConfig", "DataConfig", "EvalConfig", "DemoConfig", "load_run_config", "apply_overrides",
           "deep_merge", "LOSS_KEYS"]

LOSS_KEYS = ("temperature", "mtc_temperature", "mtc_weight", "mtc_num_key", "mtc_num_value", "mtc_rolls",
             "mtc_video_features", "mlm_weight", "vtm_weight", "span_weight")

CACHE_KINDS = ("none", "memory", "disk")


def _section_from_dict(cls, section: str, d: dict):
    """`cls(**d)`, refusing keys `cls` has no field for (the message names them and the allowed ones)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d or {}) - known)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**(d or {}))


def _check_int(section: str, name: str, v: Any, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{section}.{name} must be an int >= {lo}{' or null' if allow_none else ''}, got {v!r}")


@dataclass
class DataConfig:
    """The data of a run (YAML section `data`; formats: spec 5)."""

    # pretrain | shards | retrieval | how2qa | violin | actnetqa | classification | demo; shards: pre-training
    # streamed from WebDataset tar shards (`lfvila shard`; data/shard_stream.py, docs/multi-node.md)
    kind: str = "pretrain"
    root: Optional[str] = None  # demo: the generated set's folder
    # annotation jsonl in the kind's format (pre-training lists of {clip_id, text}, ...); shards: the shard folder
    # or its index.json
    train: Optional[str] = None
    val: Optional[str] = None  # jsonl for evaluation: the kind's format (retrieval format for pretrain)
    video_root: Optional[str] = None  # train videos
    val_video_root: Optional[str] = None  # eval videos (default: video_root)
    frames_per_clip: Optional[int] = None  # pre-training: default num_frames / num_clips
    # DataLoader worker processes per training process (training, evaluation, embedding, the demo's preloading);
    # null: min(8, CPUs per process - 1); 0: read in the training process (docs/data-loading.md)
    num_workers: Optional[int] = None
    prefetch: int = 2  # batches each worker prepares ahead
    shuffle_buffer: int = 100  # shards: samples in each worker's shuffle buffer (0: shard order)
    cache: str = "none"  # none | memory | disk (decoded-frame cache)
    cache_dir: Optional[str] = None
    max_skip_fraction: float = 0.01
    seed: int = 0
    span_fps: Optional[float] = None  # how2qa: frame rate placing frames in time for span labels (null: own, else 3)
    label_key: str = "recipe_type"  # classification: the jsonl key of the class id (COIN; LVU sets its own)
    id_key: str = "video_id"  # classification: the jsonl key of the video id (<video_root>/<id>.mp4)

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"data.kind must be a data kind name, got {self.kind!r}")
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"data.cache must be one of {CACHE_KINDS}, got {self.cache!r}")
        _check_int("data", "num_workers", self.num_workers, 0, allow_none=True)
        _check_int("data", "prefetch", self.prefetch, 1)
        _check_int("data", "shuffle_buffer", self.shuffle_buffer, 0)
        _check_int("data", "frames_per_clip", self.frames_per_clip, 1, allow_none=True)
        _check_int("data", "seed", self.seed, 0)
        if isinstance(self.max_skip_fraction, bool) or not isinstance(self.max_skip_fraction, (int, float)) \
                or not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction!r}")
        if self.span_fps is not None and not (isinstance(self.span_fps, (int, float)) and self.span_fps > 0):
            raise ValueError(f"data.span_fps must be > 0 or null, got {self.span_fps!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return _section_from_dict(cls, "data", d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """The evaluation of a run (YAML section `eval`)."""

    batch_size: int = 16
    out: str = "eval/metrics.json"  # relative to the run directory
    figure: bool = True  # the PNG beside the metrics

    def __post_init__(self):
        _check_int("eval", "batch_size", self.batch_size, 1)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"eval.out must be a file name, got {self.out!r}")
        if not isinstance(self.figure, bool):
            raise ValueError(f"eval.figure must be true or false, got {self.figure!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        return _section_from_dict(cls, "eval", d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DemoConfig:
    """The CPU demo's choices (YAML section `demo`; `train/demo_task.py` says why)."""

    paragraph_tokens: str = "cls"  # cls | all
    sentence_pooling: str = "mean"  # mean (masked token mean) | cls ([CLS] output)
    paired_batches: bool = True
    segment_init_std: Optional[float] = None  # re-draw the segment embedding at this std (null: keep BERT's)
    num_train: int = 2000  # demo set size (rendered when missing)
    num_val: int = 200
    seed: int = 0
    workers: int = 2

    def __post_init__(self):
        if self.paragraph_tokens not in ("cls", "all"):
            raise ValueError(f"demo.paragraph_tokens must be cls or all, got {self.paragraph_tokens!r}")
        if self.sentence_pooling not in ("mean", "cls"):
            raise ValueError(f"demo.sentence_pooling must be mean or cls, got {self.sentence_pooling!r}")
        if not isinstance(self.paired_batches, bool):
            raise ValueError(f"demo.paired_batches must be true or false, got {self.paired_batches!r}")
        if self.segment_init_std is not None and not (
                isinstance(self.segment_init_std, (int, float)) and self.segment_init_std > 0):
            raise ValueError(f"demo.segment_init_std must be > 0 or null, got {self.segment_init_std!r}")
        for name, lo in (("num_train", 1), ("num_val", 1), ("seed", 0), ("workers", 1)):
            _check_int("demo", name, getattr(self, name), lo)

    @classmethod
    def from_dict(cls, d: dict) -> "DemoConfig":
        return _section_from_dict(cls, "demo", d)

    def to_dict(self) -> dict:
        return asdict(self)

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (YAML section `train`). Defaults: official stage 1 (spec 4.1)."""

    out_dir: str = "runs/lfvila"
    epochs: float = 10  # passes over the training set (may be fractional)
    max_steps: Optional[int] = None  # optimizer updates; overrides epochs when set
    max_minutes: Optional[float] = None  # wall-clock budget of the training loop (checkpoint + stop when spent)
    fit_schedule_to_budget: bool = False  # with max_minutes: fit the schedule's length to the measured speed
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.05
    include_pooler: bool = False  # official: pooler parameters are not optimised (spec 4.1)
    lr_scale: dict = field(default_factory=dict)  # {param-name prefix: lr factor}
    schedule: str = "linear"  # linear | step | cosine | constant
    warmup_epochs: float = 1.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs
    lr_min_rate: float = 0.01  # linear: final lr / base lr
    step_size_epochs: float = 5.0  # step: decay every this many epochs
    gamma: float = 0.25  # step: decay factor
    min_lr: float = 1e-8  # cosine: final lr
    clip_grad: Optional[float] = None  # max global gradient L2 norm (None: no clipping)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU; fp16 uses a GradScaler; bf16 also on CPU)
    grad_checkpointing: bool = False
    # ddp: every process holds the whole model (DistributedDataParallel); fsdp: parameters, gradients and optimizer
    # state sharded over the processes (FSDP2, per transformer block), for models that do not fit one GPU under
    # DDP; checkpoints then resume on another world size (docs/fsdp.md)
    strategy: str = "ddp"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # updates between checkpoints (0: only at the end)
    keep_last: int = 3
    eval_every: int = 0  # updates between evaluations (0: only at the end)
    # keep the weights of the best evaluation in out_dir/best/ (save_pretrained format, with best.json): the name
    # of one evaluation metric, a dotted path for nested ones (accuracy, t2v.R@1); higher is better unless
    # best_mode is "min". The official fine-tuning trainers report their best validation epoch.
    best_metric: Optional[str] = None
    best_mode: str = "max"
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default); 1 is faster on a busy machine
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"train.{name} must be an int >= 1, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"train.max_steps must be an int >= 1 or null, got {self.max_steps!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"train.num_threads must be an int >= 1 or null, got {self.num_threads!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be > 0 or null, got {self.max_minutes!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"train.clip_grad must be > 0 or null, got {self.clip_grad!r}")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be max or min, got {self.best_mode!r}")
        if self.best_metric is not None and (not isinstance(self.best_metric, str) or not self.best_metric):
            raise ValueError(f"train.best_metric must be a metric name or null, got {self.best_metric!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        self.betas = tuple(self.betas)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    import yaml

    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"config {path} extends itself (base chain {seen})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    base = d.pop("base", None)
    if base:
        d = deep_merge(_read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,)), d)
    return d


def _parse_value(text: str) -> Any:
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(v)
        except ValueError:
            pass
    return v


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """`["train.lr=1e-3", "loss.mtc_weight=0"]` -> the config with those keys set (values read as YAML)."""
    cfg = copy.deepcopy(cfg)
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"--set expects key=value (dotted key), got {o!r}")
        key, val = o.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set has an empty key: {o!r}")
        d = cfg
        for p in parts[:-1]:
            if not isinstance(d.setdefault(p, {}), dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
            d = d[p]
        d[parts[-1]] = _parse_value(val)
    return cfg


def load_run_config(path: str | None, overrides: Iterable[str] = ()) -> dict:
    """Read `path` (or start empty), apply overrides, fill the section defaults."""
    cfg = _read_yaml(path) if path else {}
    cfg = apply_overrides(cfg, overrides)
    known = {"model", "loss", "data", "train", "eval", "demo"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; expected a subset of {sorted(known)}")
    cfg.setdefault("model", {})
    cfg.setdefault("loss", {})
    bad = sorted(set(cfg["loss"]) - set(LOSS_KEYS))
    if bad:
        raise ValueError(f"unknown loss keys {bad}; expected a subset of {list(LOSS_KEYS)}")
    # validated sections (dataclasses), kept as their dicts so the run config stays plain YAML / JSON
    cfg["data"] = DataConfig.from_dict(cfg.get("data") or {}).to_dict()
    cfg["eval"] = EvalConfig.from_dict(cfg.get("eval") or {}).to_dict()
    cfg["demo"] = DemoConfig.from_dict(cfg.get("demo") or {}).to_dict()
    cfg.setdefault("train", {})
    return cfg
