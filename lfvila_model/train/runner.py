"""Build and run what a run config describes (`runconfig.py`): the model, its weights, the data, the task, the
trainer and the evaluation. The command line (`lfvila_model.cli`) is a thin layer over `pretrain`/`finetune`/
`evaluate` here."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from ..data.loader import resolve_num_workers
from .distributed import DistInfo, cleanup, init_distributed
from .logging import add_run_log_file, get_logger, remove_run_log_file
from .loop import Trainer
from .demo_task import demo_evaluation, demo_job
from .runconfig import TrainConfig

__all__ = ["build_model_from_config", "run_training", "run_evaluation", "demo_result_rows"]

log = get_logger()


# -- model ---------------------------------------------------------------------------------------------------------


def model_config(cfg: dict):
    from ..config import LFVILAConfig
    from ..presets import get_config

    m = cfg.get("model", {})
    if m.get("config"):
        mc = LFVILAConfig.load(m["config"])
    else:
        mc = get_config(m.get("preset") or "lfvila-tiny")
    changes = dict(m.get("changes") or {})
    changes.update(cfg.get("loss") or {})
    return mc.replace(**changes) if changes else mc


def build_model_from_config(cfg: dict):
    """The model (random init), then the `model.init` weights: `checkpoint` (own-format directory, or an official
    `.bin`, loaded non-strictly as the official fine-tuning does), `swin` (2D Swin-B, inflated), `bert` (a BERT /
    MiniLM directory, or `minilm` for the packaged MiniLM)."""
    from ..weights import load_checked, read_state_dict
    from ..factory import build_model
    from ..presets import minilm_dir

    mc = model_config(cfg)
    model = build_model(mc)
    init = (cfg.get("model") or {}).get("init") or {}
    if init.get("swin"):
        log.info("video init from Swin: %s", model.init_video_from_swin(init["swin"]))
    if init.get("bert"):
        path = minilm_dir() if init["bert"] == "minilm" else init["bert"]
        rep = model.init_text_from_bert(path)
        log.info("text init from %s: %s", "MiniLM" if init["bert"] == "minilm" else path, rep.summary())
        log.debug("text init from %s, full report: %s", path, rep)
    ck = init.get("checkpoint")
    if ck:
        if os.path.isdir(ck) and os.path.isfile(os.path.join(ck, "model.safetensors")):
            rep = load_checked(model, read_state_dict(os.path.join(ck, "model.safetensors")), strict=False)
        else:
            rep = model.load_official(ck, strict=False)
        log.info("weights from %s: %s", ck, rep.summary())
        log.debug("weights from %s, full report: %s", ck, rep)
    return model


# -- data ----------------------------------------------------------------------------------------------------------


def _frame_cache(d: dict):
    from ..data.video import FrameCache

    if d["cache"] == "none":
        return None
    if d["cache"] == "disk":
        return FrameCache("disk", d["cache_dir"] or os.path.join(d.get("root") or ".", ".frame_cache"))
    return FrameCache("memory")


def _tokenizer(mc, num_sentences=None):
    from ..data.text import ParagraphTokenizer

    return ParagraphTokenizer(num_sentences=num_sentences or mc.num_sentences, max_length=mc.max_sentence_len)


# data.kind -> the model_type it trains (spec 4.2); pretrain and retrieval keep their own checks
KIND_MODEL_TYPES = {"how2qa": "qa_multichoice", "violin": "qa_classification", "actnetqa": "qa_classification",
                    "classification": "video_classification"}
ACCURACY_KINDS = tuple(KIND_MODEL_TYPES)


def _check_kind(kind: str, mc) -> None:
    """The data kind and the model must agree: a How2QA set fed to a classification head would fail much later
    with a shape error."""
    known = ("pretrain", "shards", "retrieval", *KIND_MODEL_TYPES)
    if kind not in known:
        raise ValueError(f"data.kind must be one of {known} (or demo), got {kind!r}")
    want = KIND_MODEL_TYPES.get(kind)
    if want is not None and mc.model_type != want:
        raise ValueError(f"data.kind={kind!r} needs a {want} model, but the model config has "
                         f"model_type={mc.model_type!r}")
    if want is None and mc.model_type in KIND_MODEL_TYPES.values():
        kinds = [k for k, t in KIND_MODEL_TYPES.items() if t == mc.model_type]
        raise ValueError(f"a {mc.model_type} model trains on data.kind in {kinds}, got data.kind={kind!r}")


def _kind_dataset(kind: str, d: dict, mc, tok, path: str, video_root: str, train: bool, cache):
    """One dataset of the QA / classification kinds (`KIND_MODEL_TYPES`), shaped for the model `mc`."""
    from ..data import qa

    common = dict(num_frames=mc.video.num_frames, size=tuple(mc.video.input_size), train=train, seed=d["seed"],
                  cache=cache)
    if kind == "how2qa":
        # M = [question, answer, subtitles]: the model's num_sentences fixes how many subtitles fit
        return qa.How2QADataset(path, video_root, tok, num_choices=mc.num_choices,
                                max_subtitles=mc.num_sentences - 2, fps=d["span_fps"], **common)
    if kind == "violin":
        return qa.ViolinDataset(path, video_root, tok, max_subtitles=mc.num_sentences - 1,
                                num_labels=mc.num_labels, **common)
    if kind == "actnetqa":
        return qa.ActivityNetQADataset(path, video_root, tok, num_labels=mc.num_labels, **common)
    return qa.VideoClassificationDataset(path, video_root, label_key=d["label_key"], id_key=d["id_key"],
                                         num_labels=mc.num_labels, **common)


def _real_datasets(cfg: dict, mc, train: bool = True):
    """`(train dataset or None, validation dataset or None)` for `data.kind` (spec 4.2, 5): pre-training (val in
    retrieval format; from clip files, or streamed from tar shards), retrieval, or one of the QA / classification kinds (train and val in the same format)."""
    from ..data.datasets import PretrainDataset, RetrievalDataset

    d = cfg["data"]
    kind = d["kind"]
    _check_kind(kind, mc)
    if kind == "how2qa" and mc.num_sentences < 2:
        raise ValueError(f"How2QA text is [question, answer, subtitles]: the model needs num_sentences >= 2, got "
                         f"{mc.num_sentences}")
    cache = _frame_cache(d)
    size = tuple(mc.video.input_size)
    tok = None if kind == "classification" else _tokenizer(mc)  # video-only classification has no text
    train_ds = val_ds = None
    if train and kind == "shards":  # pre-training streamed from tar shards: no video_root, the clips are inside
        from ..data.shard_stream import ShardStream

        if not d["train"]:
            raise ValueError("data.train (the shard folder or its index.json) is required for training")
        fpc = d["frames_per_clip"] or mc.video.num_frames // mc.num_clips
        train_ds = ShardStream(d["train"], tok, num_clips=mc.num_clips, frames_per_clip=fpc, size=size,
                               seed=d["seed"], shuffle_buffer=d["shuffle_buffer"])
    elif train:
        if not d["train"] or not d["video_root"]:
            raise ValueError("data.train and data.video_root are required for training")
        if kind == "pretrain":
            fpc = d["frames_per_clip"] or mc.video.num_frames // mc.num_clips
            train_ds = PretrainDataset(d["train"], d["video_root"], tok, num_clips=mc.num_clips, frames_per_clip=fpc,
                                       size=size, train=True, seed=d["seed"], cache=cache)
        elif kind == "retrieval":
            train_ds = RetrievalDataset(d["train"], d["video_root"], tok, num_frames=mc.video.num_frames, size=size,
                                        train=True, seed=d["seed"], cache=cache)
        else:
            train_ds = _kind_dataset(kind, d, mc, tok, d["train"], d["video_root"], True, cache)
    if d["val"]:
        val_root = d["val_video_root"] or d["video_root"]
        if not val_root:
            raise ValueError("data.val needs data.val_video_root or data.video_root (where its videos are)")
        if kind in KIND_MODEL_TYPES:
            val_ds = _kind_dataset(kind, d, mc, tok, d["val"], val_root, False, cache)
        else:  # pre-training is validated on a retrieval set (spec 4.1: ActivityNet val subset)
            val_ds = RetrievalDataset(d["val"], val_root, tok, num_frames=mc.video.num_frames, size=size,
                                      train=False, seed=d["seed"], cache=cache)
    return train_ds, val_ds


def real_data_job(cfg: dict, model, tc, dist_info, resume, out_eval: str):
    """Task, training data and evaluation of a run on real annotations (pre-training, fine-tuning)."""
    from .tasks import TASKS, PretrainTask

    mc = model.config
    kind = cfg["data"]["kind"]
    evaluate = None
    train_ds, val_ds = _real_datasets(cfg, mc)
    if mc.model_type == "pretrain":
        task = PretrainTask(mc, stage=mc.stage, max_skip_fraction=cfg["data"]["max_skip_fraction"])
    else:
        task = TASKS[mc.model_type](cfg["data"]["max_skip_fraction"])
    data = train_ds
    workers = resolve_num_workers(cfg["data"]["num_workers"])
    if val_ds is not None and kind in ACCURACY_KINDS:
        from ..eval.run import evaluate_accuracy

        def evaluate(m, step):
            return evaluate_accuracy(m, val_ds, cfg["eval"]["batch_size"], out_eval, num_workers=workers)
    elif val_ds is not None and mc.model_type in ("retrieval",) or (val_ds is not None and mc.stage == 1
                                                                     and mc.model_type == "pretrain"):
        from ..eval.run import evaluate_retrieval

        def evaluate(m, step):
            return evaluate_retrieval(m, val_ds, cfg["eval"]["batch_size"], out_eval, cfg["eval"]["figure"],
                                      num_workers=workers)
    return task, data, evaluate


# data.kind -> the job that prepares the model and builds (task, training data, evaluate); real data otherwise
JOBS = {"demo": demo_job}
EVAL_JOBS = {"demo": demo_evaluation}


# -- runs ----------------------------------------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
    from ..jsonable import jsonable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2)
    os.replace(tmp, path)


def run_training(cfg: dict, resume=False, task_kind: Optional[str] = None) -> dict:
    """Train as `cfg` says (pre-training, fine-tuning or the demo), evaluate, write `result.json` in the run
    directory. Returns the summary."""
    tc = TrainConfig.from_dict(cfg.get("train") or {})
    workers = resolve_num_workers(cfg["data"]["num_workers"])
    dist_info = init_distributed(None if tc.device == "auto" else tc.device)
    if tc.device == "auto":
        tc.device = dist_info.device.type
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed + dist_info.rank)
    log_file = add_run_log_file(tc.out_dir) if dist_info.rank == 0 else None
    try:
        model = build_model_from_config(cfg)
        mc = model.config
        kind = cfg["data"]["kind"]
        out_eval = os.path.join(tc.out_dir, cfg["eval"]["out"])
        job = JOBS.get(kind, real_data_job)
        task, data, evaluate = job(cfg, model, tc, dist_info, resume, out_eval)
        trainer = Trainer(model, task, data, tc, dist_info, evaluate=evaluate, run_config=cfg, num_workers=workers,
                          prefetch=cfg["data"]["prefetch"])
        t0 = time.time()
        summary = trainer.fit(resume=resume)
        summary["wall_minutes"] = (time.time() - t0) / 60.0
        summary["config"] = {"preset": (cfg.get("model") or {}).get("preset"), "loss": cfg.get("loss"),
                             "mtc_weight": mc.mtc_weight}
        if dist_info.is_main:
            ev = summary.get("eval") or {}
            ev.pop("ranks", None)
            _write_json(os.path.join(tc.out_dir, "result.json"), summary)
        return summary
    finally:
        remove_run_log_file(log_file)
        cleanup()


def run_evaluation(cfg: dict, checkpoint: str, out: Optional[str] = None) -> dict:
    """Evaluate an own-format checkpoint directory (a run's `checkpoints/step-*` or a `save_pretrained` dir) on the
    config's validation data: retrieval metrics (the demo adds the temporal-order score), or top-1 accuracy for the
    QA and classification kinds (how2qa, violin, actnetqa, classification)."""
    from ..factory import load_pretrained

    path = checkpoint
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from .checkpointing import latest_checkpoint

        path = latest_checkpoint(os.path.join(path, "checkpoints")) or path
    model = load_pretrained(path, strict=True)
    out = out or os.path.join(path, "eval", "metrics.json")
    if cfg["data"]["kind"] in EVAL_JOBS:
        return EVAL_JOBS[cfg["data"]["kind"]](cfg, model, out)
    from ..eval.run import evaluate_accuracy, evaluate_retrieval

    # on the device the trainer would use (train.device; auto: the GPU when there is one): a benchmark's zero-shot
    # evaluation encodes thousands of videos, far too many for the CPU when a GPU is there
    want = (cfg.get("train") or {}).get("device") or "auto"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but torch sees no GPU")
    model.to(want)
    _, val_ds = _real_datasets(cfg, model.config, train=False)
    if val_ds is None:
        raise ValueError("data.val is required for evaluation")
    workers = resolve_num_workers(cfg["data"]["num_workers"])
    if cfg["data"]["kind"] in ACCURACY_KINDS:
        return evaluate_accuracy(model, val_ds, cfg["eval"]["batch_size"], out, num_workers=workers, progress=True)
    return evaluate_retrieval(model, val_ds, cfg["eval"]["batch_size"], out, cfg["eval"]["figure"],
                              num_workers=workers, progress=True)


def demo_result_rows(run_dirs) -> list:
    rows = []
    for d in run_dirs:
        with open(os.path.join(d, "result.json")) as f:
            r = json.load(f)
        name = os.path.basename(os.path.normpath(d))
        w = (r.get("config") or {}).get("mtc_weight")
        rows.append({"name": f"{name} (MTC weight {w})", "steps": r["steps"], "minutes": r["train_minutes"],
                     "metrics": r["eval"]})
    return rows
