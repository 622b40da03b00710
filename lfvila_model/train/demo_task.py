"""The CPU demo (`make demo`, `lfvila pretrain --config configs/demo.yaml`): stage-1 pre-training (VPC + MTC) of
the `lfvila-demo` preset on the generated long-form set, then retrieval and temporal-order evaluation.

Demo choices (a 2-core CPU, 10 minutes of training), each a documented departure from the full recipe:

- Frames are decoded once (PyAV) and kept in memory as float16 after the eval transform (`preload_frames`,
  cached on disk under `<data>/packed/`): no decoding and no augmentation in the training loop. (The train
  transform's horizontal flip would also swap "moves to the left" and "moves to the right".)
- The sentence encoder (all 6 MiniLM layers, frozen) runs once over the vocabulary of distinct sentences (198 in
  the demo set); its outputs are cached (`SentenceCache`). The sentence feature is the masked mean of its tokens
  (`sentence_pooling: mean`, what MiniLM was trained for; its [CLS] output is almost the same vector for every
  sentence, cosine 0.9999, and a model trained on it stayed at chance) instead of the [CLS] output. The trainable
  text side is the paragraph encoder (one transformer layer, randomly initialised, + `SentEmbedding`) and the
  projections.
- `paragraph_tokens: cls` (default): the paragraph encoder reads the M sentence features (plus the paragraph
  token) instead of all M x L tokens: 5 tokens instead of 49 per paragraph. `all` keeps the official input.
- `segment_init_std: 0.25`: the sentence-index (segment) embedding of `SentEmbedding`, which carries the order of
  the sentences into the paragraph encoder, starts at std 0.25 instead of BERT's 0.02 (then its norm is about a
  sentence feature's, not a tenth of it).
- `paired_batches: true`: the two orders of an event set always share a batch (each is the other's hard
  negative); with uniform sampling that happens for 1.5 % of the videos, too rarely to learn order in minutes.
- `global_features="ordered"` (the `lfvila-demo` preset): the VPC features are the per-clip and per-sentence
  projections concatenated in time order (`lfvila_model/pooling.py`), so the video-paragraph score compares clip
  m with sentence m. With the official features (projected mean of the clips, projected paragraph token) the
  model learned which events a video holds but not their order: after 10 minutes the paragraph features of the
  two orders of an event set had cosine 0.99, the temporal-order score stayed at chance (0.040) and R@1 at
  32.5 %. The ordered features reached R@1 98.5 % and order 0.87 in 2.4 minutes. Same weights and losses.
- MTC with K = V = M = 4, the clean rolls (1, 2, 3) and weight 1 (`configs/demo.yaml`): every row's positive is the
  exact counterpart, the other sentences of the video are its negatives (the official K = V = 2 makes half the
  rows' positive a neighbouring sentence).
- `video.temporal_pos_embed` (the preset): a learned per-frame embedding, so a clip's mean feature can say in
  which order its frames showed things (a colour change red -> blue vs blue -> red).
Everything else is LF-VILA's: the HTWA video encoder with growing temporal windows, clip and video pooling,
the four projections, VPC and MTC with the official losses, AdamW groups, warm-up + linear decay.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objectives import mtc_loss, vpc_loss
from ..pooling import clip_means, global_paragraph_features, global_video_features
from .tasks import Task

__all__ = ["SentenceCache", "DemoData", "preload_frames", "DemoTask", "demo_features", "encode_paragraphs",
           "evaluate_demo", "format_table", "DemoSetup", "prepare_demo_model", "demo_job", "demo_evaluation"]


class SentenceCache:
    """Frozen sentence-encoder outputs of every distinct sentence.

    Args:
        model: an `LFVILAPretrain` (its sentence layers are used as they are: freeze them for training).
        sentences: the vocabulary.
        max_length: tokens per sentence (L).
    Attributes: `cls (V, D)`, `tokens (V, L, D)`, `mask (V, L)`, `index {sentence: row}`.
    """

    def __init__(self, model, sentences: Sequence[str], max_length: int, tokenizer_dir: Optional[str] = None,
                 pooling: str = "mean"):
        from ..data.text import ParagraphTokenizer

        tok = ParagraphTokenizer(tokenizer_dir, num_sentences=1, max_length=max_length)
        self.sentences = list(dict.fromkeys(sentences))
        self.index = {s: i for i, s in enumerate(self.sentences)}
        enc = [tok(s) for s in self.sentences]
        ids = torch.stack([e["input_ids"] for e in enc])  # V, 1, L
        mask = torch.stack([e["attention_mask"] for e in enc])
        was = model.training
        model.eval()
        with torch.no_grad():
            tokens, cls = model.text_encoder.encode_sentences(ids, mask)
        model.train(was)
        self.tokens = tokens[:, 0].contiguous()
        self.mask = mask[:, 0].contiguous()
        if pooling == "cls":
            self.cls = cls[:, 0].contiguous()
        elif pooling == "mean":
            # masked mean of the sentence encoder's tokens: the sentence embedding MiniLM was trained to give
            # (its [CLS] output is nearly the same vector for every sentence: pairwise cosine 0.9999)
            m = self.mask[..., None].to(self.tokens.dtype)
            self.cls = ((self.tokens * m).sum(1) / m.sum(1)).contiguous()
        else:
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")

    def ids(self, paragraph: Sequence[str]) -> Tensor:
        return torch.tensor([self.index[s] for s in paragraph], dtype=torch.long)


def encode_paragraphs(model, cache: SentenceCache, sent_ids: Tensor, paragraph_tokens: str = "cls") -> Tensor:
    """L2-normalised global paragraph features (`model.config.global_features`) for `(B, M)` sentence rows."""
    dev = sent_ids.device
    if paragraph_tokens == "cls":
        tokens = cache.cls.to(dev)[sent_ids][:, :, None]  # B, M, 1, D
        mask = torch.ones(tokens.shape[:3], dtype=torch.long, device=dev)
    elif paragraph_tokens == "all":
        tokens = cache.tokens.to(dev)[sent_ids]  # B, M, L, D
        mask = cache.mask.to(dev)[sent_ids]
    else:
        raise ValueError(f"paragraph_tokens must be 'cls' or 'all', got {paragraph_tokens!r}")
    para, _ = model.text_encoder.encode_paragraph(tokens, mask, model.sent_embedding)
    return global_paragraph_features(para, model.text_global_proj, model.config.global_features, *tokens.shape[1:3])


def demo_features(model, video: Tensor, sent_ids: Tensor, cache: SentenceCache, paragraph_tokens: str = "cls") -> dict:
    """The four normalised stage-1 features (as `LFVILAPretrain.stage1_features`) with the cached sentences."""
    cfg = model.config
    local = cfg.mtc_video_features == "local"
    pooled, pooled_local = model.video_tokens(video, return_local=local)
    clips = clip_means(pooled, cfg.num_clips)
    clip_src = clip_means(pooled_local, cfg.num_clips) if local else clips
    sent = cache.cls.to(sent_ids.device)[sent_ids]
    para = encode_paragraphs(model, cache, sent_ids, paragraph_tokens)
    return {
        "video": global_video_features(clips, model.video_global_proj, cfg.global_features),
        "paragraph": para,
        "clips": F.normalize(model.video_local_proj(clip_src), dim=-1),
        "sentences": F.normalize(model.text_local_proj(sent), dim=-1),
    }


class DemoData:
    """In-memory training set: `videos (N, 3, F, H, W)` float16, `sent_ids (N, M)` and optionally `groups (N,)`
    (the trainer then batches whole groups)."""

    def __init__(self, videos: Tensor, sent_ids: Tensor, groups: Optional[Tensor] = None):
        if videos.shape[0] != sent_ids.shape[0]:
            raise ValueError(f"videos ({videos.shape[0]}) and sent_ids ({sent_ids.shape[0]}) must have one row each")
        self.videos = videos
        self.sent_ids = sent_ids
        self.groups = groups  # event-set id per video: both orders of a set go in the same batch

    def __len__(self) -> int:
        return self.videos.shape[0]

    def get_batch(self, indices: list) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"video": self.videos[idx].float(), "sent_ids": self.sent_ids[idx]}


class DemoTask(Task):
    """Stage 1 (VPC + `mtc_weight` MTC) on cached sentences; single process (the cached text path calls the
    model's parts directly, which DDP's reducer would not see)."""

    def __init__(self, cache: SentenceCache, paragraph_tokens: str = "cls"):
        super().__init__()
        self.cache = cache
        self.paragraph_tokens = paragraph_tokens

    def loss(self, model, batch, generator):
        if hasattr(model, "module"):
            raise ValueError("the demo task runs in one process (no DDP); use `pretrain` with real data for DDP")
        cfg = model.config
        f = demo_features(model, batch["video"], batch["sent_ids"], self.cache, self.paragraph_tokens)
        vpc = vpc_loss(f["video"], f["paragraph"], cfg.temperature)
        out = {"vpc": vpc}
        loss = vpc
        if cfg.mtc_weight > 0:
            mtc = mtc_loss(f["clips"], f["sentences"], cfg.mtc_temperature, num_key=cfg.mtc_num_key,
                           num_value=cfg.mtc_num_value, rolls=cfg.mtc_rolls, generator=generator)
            out["mtc"] = mtc
            loss = loss + cfg.mtc_weight * mtc
        out["loss"] = loss
        return out


def freeze_for_demo(model) -> None:
    """Freeze the cached sentence encoder (embeddings + layers [0, S)) and the heads stage 1 never uses."""
    te = model.text_encoder
    frozen = [te.bert.embeddings, *te.bert.encoder.layer[:model.config.text.num_sentence_layers], te.bert.pooler]
    for name in ("cls", "seq_relationship"):
        if hasattr(te, name):
            frozen.append(getattr(te, name))
    if model.config.mtc_video_features == "final":
        frozen += [model.video_encoder.local_feat_proj, model.video_encoder.norm_local]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# frames


def preload_frames(dataset, cache_path: Optional[str] = None, workers: int = 2, progress: bool = True) -> Tensor:
    """Every item's `video` (eval transform) stacked as float16 `(N, 3, F, H, W)`; saved to / read from
    `cache_path` (a plain tensor file, read with `weights_only=True`). Unreadable videos raise (the demo set is
    generated locally)."""
    if cache_path and os.path.isfile(cache_path):
        t = torch.load(cache_path, map_location="cpu", weights_only=True)
        if t.shape[0] == len(dataset):
            return t
    from tqdm.auto import tqdm

    from ..data.datasets import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    out = []
    for b in tqdm(loader, desc="decoding videos", unit="batch", disable=not progress):
        if b["skipped"]:
            raise RuntimeError(f"unreadable demo videos: {[s['path'] for s in b['skipped']]}")
        out.append(b["video"].to(torch.float16))
    t = torch.cat(out)
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}"
        torch.save(t, tmp)
        os.replace(tmp, cache_path)
    return t


# --------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_demo(model, cache: SentenceCache, val_videos: Tensor, val_paragraphs: Sequence[Sequence[str]],
                  paragraph_tokens: str = "cls", batch_size: int = 50, out_path: Optional[str] = None) -> dict:
    """Text-to-video / video-to-text retrieval over the validation paragraphs and the temporal-order score (each
    video against its paragraph's sentences in all 24 orders).

    Returns `{"t2v": {...}, "v2t": {...}, "temporal_order": float, ...}`; writes JSON + PNG to `out_path`."""
    from ..data.demo_set import temporal_order_candidates
    from ..eval.retrieval import retrieval_metrics, temporal_order_score, write_metrics_json

    was = model.training
    model.eval()
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    v_feats = []
    for s in range(0, val_videos.shape[0], batch_size):
        video = val_videos[s:s + batch_size].float().to(dev)
        pooled, _ = model.video_tokens(video)
        clips = clip_means(pooled, model.config.num_clips)
        v_feats.append(global_video_features(clips, model.video_global_proj, model.config.global_features))
    v = torch.cat(v_feats).float()

    def para_feats(paragraphs):
        ids = torch.stack([cache.ids(p) for p in paragraphs]).to(dev)
        outs = []
        for s in range(0, ids.shape[0], 512):
            outs.append(encode_paragraphs(model, cache, ids[s:s + 512], paragraph_tokens))
        return torch.cat(outs).float()

    p = para_feats(val_paragraphs)
    metrics = retrieval_metrics(p @ v.T, return_ranks=True)
    cands = temporal_order_candidates([list(x) for x in val_paragraphs])
    k = len(cands[0]["candidates"])
    pc = para_feats([c for item in cands for c in item["candidates"]]).view(len(cands), k, -1)
    scores = torch.einsum("nkd,nd->nk", pc, v)
    metrics["temporal_order"] = temporal_order_score(scores, 0)
    metrics["temporal_order_candidates"] = k
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    model.train(was)
    if out_path:
        write_metrics_json(out_path, metrics)
    return metrics


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of demo results (one dict per run: name, steps, minutes, R@1/5/10, MedR, order)."""
    head = "| run | steps | train min | t2v R@1 | R@5 | R@10 | MedR | v2t R@1 | temporal order |"
    out = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["metrics"]
        out.append(f"| {r['name']} | {r['steps']} | {r['minutes']:.1f} | {m['t2v']['R@1']:.1f} | "
                   f"{m['t2v']['R@5']:.1f} | {m['t2v']['R@10']:.1f} | {m['t2v']['MedR']:.0f} | "
                   f"{m['v2t']['R@1']:.1f} | {m['temporal_order']:.3f} |")
    return "\n".join(out)


# -- the demo run: its data, model preparation and evaluation (`runner.JOBS["demo"]`) ----------------------------


class DemoSetup:
    """Everything the demo needs: the generated set (made if absent), frames in memory, the sentence cache."""

    def __init__(self, cfg: dict, model, progress: bool = True, train: bool = True):
        from ..data.datasets import PretrainDataset, RetrievalDataset
        from ..data.demo_set import make_demo_data
        from ..data.loader import resolve_num_workers

        d, dm = cfg["data"], cfg["demo"]
        root = d["root"] or "demo_data"
        mc = model.config
        F = mc.video.num_frames
        size = tuple(mc.video.input_size)
        summary = make_demo_data(root, num_train=dm["num_train"], num_val=dm["num_val"], seed=dm["seed"],
                                 workers=dm["workers"], size=size, progress=progress)
        fpc = F // mc.num_clips
        if summary["frames_per_clip"] % fpc and fpc > summary["frames_per_clip"]:
            raise ValueError(f"the demo set has {summary['frames_per_clip']} frames per clip; the model wants {fpc}")
        packed = os.path.join(root, "packed")
        tag = f"F{F}_{size[0]}x{size[1]}"
        va = RetrievalDataset(summary["val_retrieval"], summary["video_root"], None, num_frames=F, size=size, train=False)
        self.val_paragraphs = [list(r.sentences) for r in va.records]
        workers = resolve_num_workers(d["num_workers"])
        self.val_videos = preload_frames(va, os.path.join(packed, f"val_{tag}.pt"), workers=workers,
                                         progress=progress)
        sentences = {s for p in self.val_paragraphs for s in p}
        self.data = None
        if train:
            tr = PretrainDataset(summary["train"], summary["clip_root"], None, num_clips=mc.num_clips,
                                 frames_per_clip=fpc, size=size, train=False)
            train_par = [[c.text for c in s.clips[:mc.num_clips]] for s in tr.samples]
            sentences |= {s for p in train_par for s in p}
            videos = preload_frames(tr, os.path.join(packed, f"train_{tag}.pt"), workers=workers,
                                    progress=progress)
        self.cache = SentenceCache(model, sorted(sentences), mc.max_sentence_len, pooling=dm["sentence_pooling"])
        if train:
            groups = None
            if dm["paired_batches"]:
                with open(os.path.join(root, "meta.json")) as f:
                    groups = torch.tensor([v["set"] for v in json.load(f)["videos"]["train"]])
            self.data = DemoData(videos, torch.stack([self.cache.ids(p) for p in train_par]), groups)
        self.paragraph_tokens = dm["paragraph_tokens"]


def prepare_demo_model(model, cfg: dict, tc, dist_info, resume) -> None:
    """Check the model and the launch fit the demo; freeze its text tower (`freeze_for_demo`); re-draw the segment
    embedding at `demo.segment_init_std` (not when resuming)."""
    mc = model.config
    if dist_info.world_size > 1:
        raise ValueError("the demo runs in one process; launch it without torchrun")
    if tc.strategy != "ddp":
        # its task calls the model's parts, not its forward: FSDP gathers the root's weights only in forward
        raise ValueError(f"the demo trains with train.strategy=ddp (one process), got {tc.strategy!r}")
    if mc.model_type != "pretrain" or mc.stage != 1:
        raise ValueError("the demo trains a stage-1 pre-training model (model_type pretrain, stage 1)")
    freeze_for_demo(model)
    std = cfg["demo"]["segment_init_std"]
    if std and not resume:
        # the sentence-index (segment) embedding carries the order of the sentences into the paragraph
        # encoder; at BERT's init (std 0.02) it is 1/10 of a sentence feature's norm, too faint to learn
        # the order from within minutes
        torch.manual_seed(tc.seed)
        torch.nn.init.normal_(model.sent_embedding.segment_embeddings.weight, std=std)


def demo_job(cfg: dict, model, tc, dist_info, resume, out_eval: str):
    """(task, training data, evaluate) of the demo run, after `prepare_demo_model`."""
    prepare_demo_model(model, cfg, tc, dist_info, resume)
    setup = DemoSetup(cfg, model, progress=tc.progress)
    task = DemoTask(setup.cache, setup.paragraph_tokens)

    def evaluate(m, step):
        return evaluate_demo(m, setup.cache, setup.val_videos, setup.val_paragraphs, setup.paragraph_tokens,
                             out_path=out_eval)

    return task, setup.data, evaluate


def demo_evaluation(cfg: dict, model, out: str) -> dict:
    """Evaluate `model` on the demo's validation set (retrieval and temporal order)."""
    setup = DemoSetup(cfg, model, train=False)
    return evaluate_demo(model, setup.cache, setup.val_videos, setup.val_paragraphs, setup.paragraph_tokens,
                         out_path=out)
