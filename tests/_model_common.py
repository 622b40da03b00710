"""Shared helpers of the model tests: a micro version of the tiny preset (fast on 2 CPU cores) and inputs."""

import torch

from lfvila_model import get_config

MICRO_VIDEO = {"num_frames": 4, "input_size": (48, 80), "patch_size": (1, 2, 2), "attention_backend": "reference"}


def micro_config(name: str = "lfvila-tiny", **changes):
    """The tiny preset at 4 frames of 48x80 (patch 1x2x2: the same 24x40 -> 3x5 grids, 1 frame per clip; the
    8- and 16-frame windows of layers 3-5 are clipped to 4, so the bias-window quirk is exercised) and 8-token
    sentences: fast enough for a 2-core CPU."""
    video = dict(MICRO_VIDEO, **changes.pop("video", {}))
    return get_config(name, video=video, max_sentence_len=changes.pop("max_sentence_len", 8), **changes)


def make_inputs(cfg, batch: int = 2, seed: int = 0, num_sentences=None):
    g = torch.Generator().manual_seed(seed)
    v = cfg.video
    video = torch.randn(batch, 3, v.num_frames, *v.input_size, generator=g)
    M, L = num_sentences or cfg.num_sentences, cfg.max_sentence_len
    ids = torch.randint(1000, 5000, (batch, M, L), generator=g)
    ids[:, :, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    lengths = torch.randint(3, L + 1, (batch, M), generator=g)
    mask[torch.arange(L)[None, None, :] >= lengths[..., None]] = 0
    if M > 1:
        mask[0, -1] = 0  # an all-[PAD] sentence, as paragraphs shorter than M sentences have
    ids[mask == 0] = 0
    return video, ids, mask
