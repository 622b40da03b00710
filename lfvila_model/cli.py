"""`lfvila`: the command line of LF-VILA (also `python -m lfvila_model`).

    lfvila make-demo-data DIR            render the long-form demo set (mp4 files + annotations)
    lfvila prepare activitynet|didemo    public benchmark annotations -> retrieval jsonl, videos -> 3 fps mp4
    lfvila prepare clips                 HD-VILA-100M metadata + transcripts + videos -> 3 fps clips, pretrain.jsonl
    lfvila shard                         pretrain.jsonl + clips -> WebDataset tar shards + index.json
    lfvila pretrain --config YAML        stage-1 / stage-2 pre-training (and the CPU demo: configs/demo.yaml)
    lfvila finetune --config YAML        fine-tuning: retrieval, How2QA, VIOLIN, ActivityNet-QA, COIN/LVU
    lfvila evaluate --config YAML --checkpoint DIR   retrieval metrics (+ temporal order on the demo set) or
                                                     QA / classification accuracy
    lfvila convert-checkpoint IN OUT     official .bin -> own format (config.json + model.safetensors) and back
    lfvila info                          environment, op backends, presets and their parameter counts
    lfvila embed --checkpoint DIR --videos DIR --out PREFIX   index your own videos (features + ids)
    lfvila search --index PREFIX "a paragraph"                rank the indexed videos for a paragraph
    lfvila serve --index PREFIX --videos DIR                  a local search page over the index

Every training/eval command reads a run YAML (see `lfvila_model/train/runconfig.py` and `configs/`) and takes
`--set section.key=value` overrides, e.g. `--set train.lr=1e-4 --set loss.mtc_weight=0`.
Multi-process training: `torchrun --nproc_per_node N -m lfvila_model pretrain --config ...` (DDP; gloo on CPU,
NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _add_run_options(p: argparse.ArgumentParser, training: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="YAML",
                   help="run config (sections model/loss/data/train/eval/demo; see configs/train_*.yaml, "
                        "configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted, value parsed as YAML), repeatable: "
                        "--set train.lr=1e-4 --set loss.mtc_weight=0 --set model.preset=lfvila-tiny")
    p.add_argument("--preset", help="model preset (shorthand for --set model.preset=NAME)")
    if training:
        p.add_argument("--out", "-o", metavar="DIR", help="run directory (train.out_dir): checkpoints, metrics.jsonl, "
                                                          "tensorboard/, eval/, result.json")
        p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                       help="continue from the latest checkpoint of the run directory (or from CKPT), exactly "
                            "where it stopped: model, optimizer, schedule, RNG and data position")
        p.add_argument("--max-minutes", type=float, metavar="M",
                       help="wall-clock budget of the training loop (train.max_minutes); the schedule is fitted to "
                            "it when train.fit_schedule_to_budget is true")
        p.add_argument("--max-steps", type=int, metavar="N", help="optimizer updates to run (train.max_steps)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="train.device")
        p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lfvila", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `lfvila COMMAND --help` for the options of a command.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("make-demo-data", help="render the long-form demo video-paragraph set",
                       description="Render the demo set: videos of 4 clips, one event (an object of some colour "
                                   "and shape that moves, appears, grows or changes colour) and one sentence per "
                                   "clip; every event set is rendered in two orders. Deterministic by seed; "
                                   "skipped when DIR already holds the same set.")
    p.add_argument("dir", help="output folder (train.jsonl, val.jsonl, val_retrieval.jsonl, clips/, videos/, meta.json)")
    p.add_argument("--num-train", type=int, default=2000, help="training videos (even; default 2000)")
    p.add_argument("--num-val", type=int, default=200, help="validation videos (even; default 200)")
    p.add_argument("--seed", type=int, default=0, help="everything is a function of it (default 0)")
    p.add_argument("--frames-per-clip", type=int, default=4, help="frames rendered per clip (default 4)")
    p.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"), help="frame size (default 64 96)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: min(2, CPUs))")
    p.add_argument("--force", action="store_true", help="regenerate even if DIR holds the same set")
    _add_prepare_parser(sub)
    _register_shard(sub)

    p = sub.add_parser("pretrain", help="pre-train (stage 1: VPC + MTC; stage 2: MLM + VTM) or run the CPU demo",
                       description="Pre-training. Stage 1 trains the dual encoder with VPC + MTC, stage 2 the "
                                   "cross-modal encoder with MLM + VTM (set by the model config's `stage`). With "
                                   "data.kind=demo (configs/demo.yaml) it makes the demo set if needed, trains on "
                                   "the CPU and prints the retrieval / temporal-order table.",
                       epilog="Reads data.train: with data.kind=pretrain (configs/train_stage1.yaml) a "
                              "pretrain.jsonl and its clips under data.video_root (OUT/pretrain.jsonl and "
                              "OUT/clips of `lfvila prepare clips`); with data.kind=shards the shard folder of "
                              "`lfvila shard` (--set data.kind=shards --set data.train=SHARDS_DIR). Writes the run "
                              "directory (--out): checkpoints/, metrics.jsonl, tensorboard/, result.json. On many "
                              "nodes, run it under torchrun (docs/multi-node.md). Then: `lfvila evaluate "
                              "--checkpoint RUN_DIR`, or fine-tune from it with `lfvila finetune --set "
                              "model.init.checkpoint=RUN_DIR/checkpoints/step-NNNNNNNN` "
                              "(docs/pretraining-at-scale.md).")
    _add_run_options(p)
    p = sub.add_parser("finetune", help="fine-tune for retrieval, QA or classification",
                       description="Fine-tuning: the task follows the model config's model_type (retrieval, "
                                   "qa_multichoice, qa_classification, video_classification) and data.kind the "
                                   "annotation format (retrieval, how2qa, violin, actnetqa, classification; "
                                   "configs/finetune_*.yaml); init weights with --set model.init.checkpoint=PATH "
                                   "(official .bin or own directory). QA and classification runs report "
                                   "validation accuracy.")
    _add_run_options(p)

    p = sub.add_parser("evaluate", help="retrieval metrics or QA/classification accuracy of a checkpoint; or a "
                                        "table of demo runs",
                       description="Retrieval (data.kind retrieval/pretrain/demo): encode the validation videos and "
                                   "paragraphs, rank from the full similarity matrix: t2v / v2t R@1/5/10/50, MedR, "
                                   "MeanR as JSON + a PNG figure (the demo adds the temporal-order score). QA and "
                                   "classification (data.kind how2qa, violin, actnetqa, classification): top-1 "
                                   "accuracy as JSON. With --table, print a Markdown table of finished runs' "
                                   "result.json instead.")
    _add_run_options(p, training=False)
    p.add_argument("--checkpoint", metavar="DIR", help="own-format checkpoint directory, or a run directory "
                                                       "(its latest checkpoint)")
    p.add_argument("--out", "-o", metavar="JSON", help="metrics file (default <checkpoint>/eval/metrics.json)")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print the results table of these run directories")
    p.add_argument("--table-out", metavar="MD", help="also write the table to this Markdown file")

    p = sub.add_parser("convert-checkpoint", help="official .bin <-> own format (config.json + model.safetensors)",
                       description="Convert weights. To own format: IN is an official lfvila_stage1.bin / "
                                   "lfvila_stage2.bin (or any state-dict file), loaded into the model of --preset/"
                                   "--config and written to the directory OUT. To official: IN is an own-format "
                                   "directory and OUT a .bin state dict with the official names.")
    p.add_argument("src", metavar="IN")
    p.add_argument("dst", metavar="OUT")
    p.add_argument("--preset", default="lfvila-official", help="model preset of an official file (default "
                                                               "lfvila-official; lfvila-official-stage2 for stage 2)")
    p.add_argument("--config", help="model YAML/JSON instead of --preset")
    p.add_argument("--to", choices=("own", "official"), help="direction (default: from the file types)")
    p.add_argument("--non-strict", action="store_true", help="load what fits and report the rest")

    p = sub.add_parser("info", help="environment, op backends, presets and parameter counts",
                       description="Print versions (python, torch, CUDA, triton), which op backends can run here, "
                                   "and each preset's model type and parameter count (built on the meta device).")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for register in (_register_embed, _register_search, _register_serve):
        register(sub)
    return ap


# -- commands --------------------------------------------------------------------------------------------------------


def _run_cfg(args, training: bool = True) -> dict:
    from .train.runconfig import load_run_config

    ov = list(args.overrides)
    if args.preset:
        ov.append(f"model.preset={args.preset}")
    if training:
        if args.out:
            ov.append(f"train.out_dir={args.out}")
        if args.max_minutes is not None:
            ov.append(f"train.max_minutes={args.max_minutes}")
        if args.max_steps is not None:
            ov.append(f"train.max_steps={args.max_steps}")
        if args.device:
            ov.append(f"train.device={args.device}")
        if args.no_progress:
            ov.append("train.progress=false")
    return load_run_config(args.config, ov)


def _print_summary(summary: dict, cfg: dict) -> None:
    ev = summary.get("eval") or {}
    print(f"\ntrained {summary['steps']} steps in {summary['train_minutes']:.2f} min ({summary['stop_reason']}); "
          f"run directory {cfg['train'].get('out_dir', 'runs/lfvila')}")
    if "t2v" in ev:
        from .train.demo_task import format_table

        if "temporal_order" in ev:
            print(format_table([{"name": "this run", "steps": summary["steps"], "minutes": summary["train_minutes"],
                                 "metrics": ev}]))
        else:
            print(json.dumps({k: ev[k] for k in ("t2v", "v2t")}, indent=2))
    elif "accuracy" in ev:
        print(f"validation accuracy {ev['accuracy']:.2f}% on {ev['num_examples']} examples "
              f"({len(ev.get('skipped_videos') or [])} unreadable videos skipped)")


def cmd_make_demo_data(args) -> int:
    from .data.demo_set import make_demo_data

    s = make_demo_data(args.dir, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                       frames_per_clip=args.frames_per_clip, size=tuple(args.size), workers=args.workers,
                       force=args.force)
    print(f"demo set in {s['out_dir']}: {s['num_train']} train + {s['num_val']} val videos, {s['num_events']} events, "
          f"{s['frames_per_clip']} frames per clip at {s['size'][0]}x{s['size'][1]} ({s['seconds']} s)")
    return 0


# -- prepare: public data into the formats the configs read (one target each: _PREPARE_TARGETS) --------------------

_BENCHMARK_FILES = {
    "activitynet": ("ActivityNet Captions", "train.json, val_1.json, val_2.json ({video_id: {duration, timestamps, "
                                            "sentences}})", "train.jsonl, val.jsonl (from val_1), val_2.jsonl",
                    "sentences ordered by timestamp start; clip_id is the annotation key (v_<YouTube id>)"),
    "didemo": ("DiDeMo", "train_data.json, val_data.json, test_data.json (lists of {video, description, times})",
               "train.jsonl, val.jsonl, test.jsonl",
               "descriptions ordered by their earliest start over the annotators' times; clip_id is the video "
               "file name without its extension"),
}


def _benchmark_arguments(p: argparse.ArgumentParser, dataset: str) -> None:
    import textwrap

    name, files, outputs, order = _BENCHMARK_FILES[dataset]
    p.description = f"Convert {name} to the retrieval format and re-encode its videos.\n\n" + textwrap.fill(
        f"Reads {files} from --annotations (absent files are skipped) and writes {outputs} to --out: one row "
        f"{{\"clip_id\", \"text\": [sentences]}} per video, whitespace stripped, {order}. Videos are looked up in "
        f"--videos (recursively, any extension PyAV opens) and re-encoded to OUT/videos/<clip_id>.mp4 at --fps, in "
        f"parallel; a second run redoes nothing already encoded. Rows whose video is missing or unreadable are "
        f"left out of the jsonl files; OUT/report.json lists them and every missing and unreadable video.", 100)
    p.epilog = textwrap.fill(
        "Then: lfvila finetune -c configs/finetune_retrieval.yaml --set data.train=OUT/train.jsonl "
        "--set data.val=OUT/val.jsonl --set data.video_root=OUT/videos; zero-shot: lfvila evaluate "
        "--checkpoint PRETRAIN_DIR --set data.val=OUT/val.jsonl --set data.video_root=OUT/videos "
        "(docs/benchmarks-data.md).", 100)
    p.add_argument("--annotations", required=True, metavar="DIR", help=f"folder of the {name} annotation files")
    p.add_argument("--videos", required=True, metavar="RAW_DIR", help="folder of the downloaded videos (searched "
                                                                       "recursively)")
    p.add_argument("--out", "-o", required=True, metavar="OUT", help="output folder: the jsonl files, videos/, "
                                                                      "report.json")
    p.add_argument("--fps", type=float, default=3.0, help="frame rate of the re-encoded videos (default 3, as "
                                                          "LF-VILA samples)")
    p.add_argument("--short-side", type=int, metavar="S", help="scale the shorter side to S pixels, aspect kept "
                                                               "(default: keep the size; 240 matches the first "
                                                               "resize of the evaluation of 192x320 models, 240x428)")
    p.add_argument("--workers", type=int, metavar="N", help="re-encoding processes (default: the CPUs available)")
    split_names = "train, val, val_2" if dataset == "activitynet" else "train, val, test"
    id_note = (" ActivityNet ids match with or without their v_ prefix." if dataset == "activitynet" else
               " DiDeMo ids match with or without the file extension.")
    p.add_argument("--split-list", action="append", default=[], metavar="[SPLIT=]FILE",
                   help=f"keep only the videos listed in FILE (one id per line), in split SPLIT ({split_names}) or, "
                        f"without SPLIT=, in every split; repeatable.{id_note}")
    if dataset == "didemo":
        p.add_argument("--max-seconds", type=float, metavar="S",
                       help="keep at most the first S seconds of each video (the annotations cover the first 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_benchmark(args) -> int:
    from .data.benchmarks import prepare_benchmark

    rep = prepare_benchmark(args.target, args.annotations, args.videos, args.out, fps=args.fps,
                            short_side=args.short_side, max_seconds=getattr(args, "max_seconds", None),
                            workers=args.workers, split_lists=args.split_list, progress=not args.no_progress)
    v = rep["videos"]
    for split, info in rep["splits"].items():
        print(f"{split}: {info['rows']} rows -> {info['jsonl'] or '(none written)'}")
    print(f"videos: {v['total']} ({v['encoded_now']} encoded now, {v['already_encoded']} already there, "
          f"{v['missing']} missing, {v['unreadable']} unreadable) in {rep['video_root']}; report "
          f"{os.path.join(rep['out'], 'report.json')}")
    return 0


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _clips_arguments(p: argparse.ArgumentParser) -> None:
    import textwrap

    p.description = "Cut the HD-VILA-100M clips of the pre-training samples and write OUT/pretrain.jsonl.\n\n" + \
        textwrap.fill(
            "META has one video a line: {\"video_id\", \"url\", \"clip\": [{\"clip_id\": \"<video_id>.<n>.mp4\", "
            "\"span\": [\"hh:mm:ss.fff\", \"hh:mm:ss.fff\"]}, ...]}; TEXT one {\"clip_id\", \"text\"} a line; "
            "--videos holds <video_id>.<ext> (searched recursively, any container PyAV opens). A sample is each "
            "maximal run of at least --min-clips consecutive clip numbers of one video that all have a text and "
            "were cut. The clips of such runs are cut by their spans (frame-accurate), re-encoded at --fps (and "
            "--short-side) to OUT/clips/<video_id>/<clip_id>, in parallel; a second run redoes nothing already "
            "cut, and a missing or unreadable video is never fatal. OUT/pretrain.jsonl holds one sample a line "
            "([{\"clip_id\", \"text\"}, ...]); OUT/report.json lists the missing and unreadable videos and "
            "clips.", 100)
    p.epilog = textwrap.fill(
        "Then: lfvila shard --annotations OUT/pretrain.jsonl --videos OUT/clips --out SHARDS, or train on the "
        "files: --set data.train=OUT/pretrain.jsonl --set data.video_root=OUT/clips "
        "(docs/pretraining-at-scale.md).", 100)
    p.add_argument("--meta", required=True, metavar="META.jsonl", help="HD-VILA-100M metadata, one video a line")
    p.add_argument("--transcripts", required=True, metavar="TEXT.jsonl", help="one {clip_id, text} a line")
    p.add_argument("--videos", required=True, metavar="RAW_DIR", help="the downloaded videos <video_id>.<ext>")
    p.add_argument("--out", "-o", required=True, metavar="OUT", help="output folder: clips/, pretrain.jsonl, "
                                                                      "report.json")
    p.add_argument("--fps", type=_positive_float, default=3.0, help="frame rate of the clips (default 3, as LF-VILA "
                                                                    "samples)")
    p.add_argument("--short-side", type=_at_least(2), metavar="S", help="scale the shorter side to S pixels, aspect kept "
                                                               "(default: keep the size; 720 for HD-VILA's 720p)")
    p.add_argument("--min-clips", type=_at_least(1), default=4, metavar="K", help="fewest consecutive clips in a sample "
                                                                          "(default 4, as LF-VILA-8M)")
    p.add_argument("--workers", type=_at_least(1), metavar="N", help="processes cutting clips (default: the CPUs "
                                                                        "available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_clips(args) -> int:
    from .data.hdvila import prepare_clips

    try:
        rep = prepare_clips(args.meta, args.transcripts, args.videos, args.out, fps=args.fps,
                            short_side=args.short_side, min_clips=args.min_clips, workers=args.workers,
                            progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:  # a bad argument or input line: its message, no traceback
        raise SystemExit(f"lfvila prepare clips: error: {e}") from None
    v, c = rep["videos"], rep["clips"]
    print(f"{rep['samples']} samples ({c['in_samples']} clips) -> {rep['pretrain_jsonl'] or '(none written)'}")
    print(f"clips: {c['in_candidate_runs']} in runs of >= {args.min_clips} ({c['cut_now']} cut now, "
          f"{c['already_cut']} already there, {c['failed']} failed); videos: {v['in_meta']} in META, "
          f"{v['missing']} missing, {v['unreadable']} unreadable; report {os.path.join(rep['out'], 'report.json')}")
    return 0


# target -> (one-line help, add its arguments, run it)
_PREPARE_TARGETS = {
    "activitynet": ("ActivityNet Captions -> retrieval jsonl + 3 fps videos",
                    lambda p: _benchmark_arguments(p, "activitynet"), _run_benchmark),
    "didemo": ("DiDeMo -> retrieval jsonl + 3 fps videos", lambda p: _benchmark_arguments(p, "didemo"),
               _run_benchmark),
    "clips": ("HD-VILA-100M metadata + transcripts + videos -> 3 fps clips + pretrain.jsonl", _clips_arguments,
              _run_clips),
}


def _add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="put public data into shape: " + ", ".join(_PREPARE_TARGETS),
                       description="Put public data into the formats the configs read. One target per dataset; "
                                   "`lfvila prepare TARGET --help` gives its options.")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for name, (help_text, add_arguments, _) in _PREPARE_TARGETS.items():
        add_arguments(targets.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter))


def cmd_prepare(args) -> int:
    return _PREPARE_TARGETS[args.target][2](args)


def _register_shard(sub) -> None:
    p = sub.add_parser("shard", help="pack pretrain.jsonl and its clips into WebDataset tar shards",
                       description="Read the pre-training samples of pretrain.jsonl and their clip files under "
                                   "CLIPS_DIR (both written by `lfvila prepare clips`) and write "
                                   "SHARDS_DIR/shard-000000.tar, ... (WebDataset tar files, --samples-per-shard "
                                   "samples each, in the order of the annotations) and SHARDS_DIR/index.json (shard "
                                   "names, sample counts, the total). A sample is <key>.json ({video_id, clips, "
                                   "texts}) and <key>.clip000.mp4, <key>.clip001.mp4, ... (its clips' bytes), "
                                   "its key s<line number in pretrain.jsonl, from 0>. Each shard is read back "
                                   "and checked before it gets its name. A sample with a missing clip file is "
                                   "skipped and counted (index.json, report.json); with none left it fails.",
                       epilog="Then: lfvila pretrain --config configs/train_stage1.yaml --set data.kind=shards "
                              "--set data.train=SHARDS_DIR --out RUN_DIR, on many nodes under torchrun "
                              "(docs/multi-node.md, docs/pretraining-at-scale.md).")
    p.add_argument("--annotations", required=True, metavar="pretrain.jsonl", help="pre-training samples, one list "
                                                                                   "of {clip_id, text} a line")
    p.add_argument("--videos", required=True, metavar="CLIPS_DIR", help="clip folder: <video_id>/<clip_id> "
                                                                         "(OUT/clips of `lfvila prepare clips`)")
    p.add_argument("--out", "-o", required=True, metavar="SHARDS_DIR", help="shard folder (created; shards and an "
                                                                             "index already there are replaced)")
    p.add_argument("--samples-per-shard", type=_at_least(1), default=1000, metavar="N", help="samples per shard (default "
                                                                                    "1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_shard(args) -> int:
    from .data.shards import write_shards

    try:
        index = write_shards(args.annotations, args.videos, args.out, samples_per_shard=args.samples_per_shard,
                             progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"lfvila shard: error: {e}") from None
    rep = index["report"]
    if not index["total"]:  # data.kind: shards reads no empty set: say so here, not at the first training step
        raise SystemExit(f"lfvila shard: error: no sample written ({index['skipped']} of "
                         f"{rep['samples_in_annotations']} skipped: clip file missing or empty; see "
                         f"{os.path.join(args.out, 'report.json')})")
    print(f"{index['total']} samples in {len(index['shards'])} shards ({rep['bytes'] / 1e6:.1f} MB) -> "
          f"{os.path.join(args.out, 'index.json')}; {index['skipped']} skipped (clip file missing), report "
          f"{os.path.join(args.out, 'report.json')}")
    return 0


def cmd_train(args) -> int:
    from .train.runner import run_training

    cfg = _run_cfg(args)
    summary = run_training(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary, cfg)
    return 0


def cmd_evaluate(args) -> int:
    if args.table:
        from .train.demo_task import format_table
        from .train.runner import demo_result_rows

        table = format_table(demo_result_rows(args.table))
        print(table)
        if args.table_out:
            with open(args.table_out, "w") as f:
                f.write(table + "\n")
        return 0
    if not args.checkpoint:
        raise SystemExit("evaluate: --checkpoint DIR (or --table RUN_DIR ...) is required")
    from .train.runner import run_evaluation

    cfg = _run_cfg(args, training=False)
    m = run_evaluation(cfg, args.checkpoint, args.out)
    m.pop("ranks", None)
    print(json.dumps(m, indent=2, default=str))
    return 0


def cmd_convert(args) -> int:
    from .weights import load_checked, read_state_dict, save_pretrained
    from .config import LFVILAConfig
    from .factory import build_model
    from .presets import get_config

    to = args.to or ("official" if os.path.isdir(args.src) else "own")
    if to == "own":
        cfg = LFVILAConfig.load(args.config) if args.config else get_config(args.preset)
        model = build_model(cfg)
        rep = model.load_official(args.src, strict=not args.non_strict)
        save_pretrained(model, args.dst)
        print(f"{args.src} -> {args.dst} (own format): {rep}")
        return 0
    import torch

    from .factory import load_pretrained

    model = load_pretrained(args.src, strict=not args.non_strict)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = f"{args.dst}.tmp{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, args.dst)
    print(f"{args.src} -> {args.dst} (official state-dict names, {len(sd)} tensors)")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads()}
    for mod in ("triton", "transformers", "safetensors", "av", "tensorboard"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 (report, do not fail)
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        from lfvila_kernels.backends import cpp as _ext

        info["cpp_extension"] = bool(getattr(_ext, "available", lambda: True)())
    except Exception as e:  # noqa: BLE001
        info["cpp_extension"] = f"unavailable ({e})"
    from .factory import build_model
    from .presets import PRESETS, get_config

    presets = {}
    for name in sorted(PRESETS):
        cfg = get_config(name)
        with torch.device("meta"):
            m = build_model(cfg)
        n = sum(p.numel() for p in m.parameters())
        nv = sum(p.numel() for p in m.video_encoder.parameters())
        presets[name] = {"model_type": cfg.model_type, "stage": cfg.stage, "params_M": round(n / 1e6, 2),
                         "video_params_M": round(nv / 1e6, 2), "frames": cfg.video.num_frames,
                         "input": list(cfg.video.input_size)}
    info["presets"] = presets
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k != "presets":
            print(f"{k:>15}: {v}")
    print("\npresets (parameters in millions):")
    for name, p in presets.items():
        print(f"  {name:34s} {p['model_type']:21s} stage {p['stage']}  {p['params_M']:8.2f} M (video "
              f"{p['video_params_M']:.2f} M)  {p['frames']} frames {p['input'][0]}x{p['input'][1]}")
    return 0


# -- your own videos: embed, search, serve (docs/own-videos.md) ---------------------------------------------------


def _register_embed(sub) -> None:
    p = sub.add_parser("embed", help="encode your own videos into a searchable index",
                       description="Encode every video of a folder (searched recursively for the usual video "
                                   "extensions) or the files given, sampled as the retrieval evaluation samples them "
                                   "(the model's frame count evenly over the whole video, resized and centre-cropped "
                                   "to its input size). Writes PREFIX.safetensors (features: float32 (N, E), "
                                   "L2-normalised) and PREFIX.json (ids: paths relative to the videos folder in row "
                                   "order; skipped: {path: reason} of the files that could not be decoded; the "
                                   "checkpoint, preset, frame count and input size used). Unreadable files are "
                                   "skipped and listed, never fatal.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="own-format checkpoint folder (save_pretrained, a run's "
                                                         "checkpoints/step-N, or convert-checkpoint's output) of a "
                                                         "pre-training or retrieval model, or a run directory (its "
                                                         "latest checkpoint)")
    src.add_argument("--preset", metavar="NAME", help="a preset instead (untrained video tower, seeded: for trying "
                                                      "the commands, not for meaningful rankings)")
    p.add_argument("--videos", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="a folder of videos, or video files; ids are relative to the folder (to the deepest folder "
                        "holding all the files)")
    p.add_argument("--out", "-o", required=True, metavar="PREFIX", help="writes PREFIX.safetensors and PREFIX.json")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes decoding videos (default: min(8, "
                                                             "CPUs - 1); 0 decodes in the main process)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16); the CPU runs fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_embed(args) -> int:
    from .eval.embed import embed_videos

    checkpoint = args.checkpoint
    if checkpoint and os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a run directory: its latest
        from .train.checkpointing import latest_checkpoint

        checkpoint = latest_checkpoint(os.path.join(checkpoint, "checkpoints")) or checkpoint
    doc = embed_videos(args.videos, args.out, checkpoint=checkpoint, preset=args.preset,
                       batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                       precision=args.precision, progress=not args.no_progress)
    print(f"{len(doc['ids'])} videos -> {args.out}.safetensors ({len(doc['ids'])} x {doc['dim']}, {doc['precision']}) "
          f"and {args.out}.json; {len(doc['skipped'])} skipped")
    for path, reason in doc["skipped"].items():
        print(f"  skipped {path}: {reason}")
    return 0


def _register_search(sub) -> None:
    p = sub.add_parser("search", help="rank the indexed videos for a paragraph",
                       description="Load an index written by `lfvila embed` and the model it names, encode the "
                                   "paragraph (split into sentences after . ! ? and at line breaks) and rank the "
                                   "indexed videos by cosine similarity, best first.")
    p.add_argument("paragraph", help='the text to search for, e.g. "A man opens a door. He walks in."')
    p.add_argument("--index", required=True, metavar="PREFIX", help="the index (PREFIX.json + PREFIX.safetensors)")
    p.add_argument("--top-k", "-k", type=int, default=10, metavar="K", help="results to show (default 10)")
    p.add_argument("--json", action="store_true", help='print a JSON list of {"id", "score"}, best first')
    p.add_argument("--device", default="cpu", help="where the text is encoded (default cpu)")


def cmd_search(args) -> int:
    from .eval.embed import resolve_device
    from .eval.search import Searcher, results_json

    results = Searcher(args.index, device=resolve_device(args.device)).search(args.paragraph, top_k=args.top_k)
    if args.json:
        print(results_json(results))
    else:
        for n, r in enumerate(results, 1):
            print(f"{n:4d}  {r['score']:+.4f}  {r['id']}")
    return 0


def _register_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local search page over an index",
                       description="Serve a search page: a text box, and the ranked videos with their poster frame, "
                                   "score and a player. GET /api/search?q=TEXT&k=K returns the same JSON as "
                                   "`lfvila search --json`. Only the indexed videos inside --videos are served.")
    p.add_argument("--index", required=True, metavar="PREFIX", help="the index written by `lfvila embed`")
    p.add_argument("--videos", required=True, metavar="DIR", help="the folder given to `lfvila embed --videos`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="where queries are encoded (default cpu)")


def cmd_serve(args) -> int:
    from .eval.embed import resolve_device
    from .serve import serve

    serve(args.index, args.videos, host=args.host, port=args.port, device=resolve_device(args.device))
    return 0


COMMANDS = {"make-demo-data": cmd_make_demo_data, "prepare": cmd_prepare, "pretrain": cmd_train, "finetune": cmd_train,
            "evaluate": cmd_evaluate, "convert-checkpoint": cmd_convert, "info": cmd_info,
            "embed": cmd_embed, "search": cmd_search, "serve": cmd_serve, "shard": cmd_shard}


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
