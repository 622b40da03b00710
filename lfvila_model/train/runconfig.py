"""Run configuration: YAML files with `--set key=value` overrides (dotted keys, YAML-typed values).

A run YAML has these sections (all optional; `configs/train_*.yaml` and `configs/demo.yaml` are examples):

    base: other.yaml        # a YAML this one extends (path relative to this file); sections are deep-merged
    model:
      preset: lfvila-demo   # a preset name (lfvila_model.presets) ...
      config: null          # ... or a model YAML/JSON (configs/lfvila_*.yaml); `changes` are applied on top
      changes: {}           # LFVILAConfig fields, e.g. {mtc_weight: 0.0, video: {drop_path_rate: 0.1}}
      init: {checkpoint: null, swin: null, bert: null}   # weights: own dir / official .bin, Swin-B, BERT dir
    loss: {}                # shorthand for model.changes of the loss fields (mtc_weight, temperature, ...)
    data: {...}             # see DATA_DEFAULTS
    train: {...}            # lfvila_model.train.loop.TrainConfig
    eval: {...}             # see EVAL_DEFAULTS
    demo: {...}             # see DEMO_DEFAULTS
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable

__all__ = ["load_run_config", "apply_overrides", "deep_merge", "DATA_DEFAULTS", "EVAL_DEFAULTS", "DEMO_DEFAULTS",
           "LOSS_KEYS"]

LOSS_KEYS = ("temperature", "mtc_temperature", "mtc_weight", "mtc_num_key", "mtc_num_value", "mtc_rolls",
             "mtc_video_features", "mlm_weight", "vtm_weight", "span_weight")

DATA_DEFAULTS = {
    # pretrain | retrieval | how2qa | violin | actnetqa | classification | demo (formats: spec 5)
    "kind": "pretrain",
    "root": None,  # demo: the generated set's folder
    "train": None,  # annotation jsonl in the kind's format (pre-training lists of {clip_id, text}, retrieval, ...)
    "val": None,  # jsonl for evaluation: the kind's format (retrieval format for pretrain)
    "video_root": None,  # train videos
    "val_video_root": None,  # eval videos (default: video_root)
    "frames_per_clip": None,  # pre-training: default num_frames / num_clips
    # DataLoader worker processes per training process (training, evaluation, the demo's preloading); null:
    # min(8, CPUs per process - 1); 0: read in the training process (docs/data-loading.md)
    "num_workers": None,
    "prefetch": 2,  # batches each worker prepares ahead
    "cache": "none",  # none | memory | disk (decoded-frame cache)
    "cache_dir": None,
    "max_skip_fraction": 0.01,
    "seed": 0,
    "span_fps": None,  # how2qa: frame rate placing frames in time for span labels (null: the video's own, else 3)
    "label_key": "recipe_type",  # classification: the jsonl key of the class id (COIN; LVU sets its own)
    "id_key": "video_id",  # classification: the jsonl key of the video id (<video_root>/<id>.mp4)
}
EVAL_DEFAULTS = {"batch_size": 16, "out": "eval/metrics.json", "figure": True}
DEMO_DEFAULTS = {"paragraph_tokens": "cls", "sentence_pooling": "mean", "paired_batches": True,
                 "segment_init_std": None, "num_train": 2000, "num_val": 200, "seed": 0, "workers": 2}


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
    cfg["data"] = deep_merge(DATA_DEFAULTS, cfg.get("data") or {})
    cfg["eval"] = deep_merge(EVAL_DEFAULTS, cfg.get("eval") or {})
    cfg["demo"] = deep_merge(DEMO_DEFAULTS, cfg.get("demo") or {})
    cfg.setdefault("train", {})
    for sec, defaults in (("data", DATA_DEFAULTS), ("eval", EVAL_DEFAULTS), ("demo", DEMO_DEFAULTS)):
        extra = sorted(set(cfg[sec]) - set(defaults))
        if extra:
            raise ValueError(f"unknown {sec} keys {extra}; expected a subset of {sorted(defaults)}")
    nw, pf = cfg["data"]["num_workers"], cfg["data"]["prefetch"]
    if nw is not None and (isinstance(nw, bool) or not isinstance(nw, int) or nw < 0):
        raise ValueError(f"data.num_workers must be an int >= 0 or null (automatic), got {nw!r}")
    if isinstance(pf, bool) or not isinstance(pf, int) or pf < 1:
        raise ValueError(f"data.prefetch must be an int >= 1, got {pf!r}")
    return cfg
