"""The helpers the tests share: the one tiny model config, inputs and an in-memory dataset, features for the loss
tests, and a folder of small real videos. Imported as `tests.helpers` (tests/ is a package; the root conftest.py
puts the repository root on sys.path, so this works from the root, from a fresh clone and for a single file).

Fixtures that are fixtures by nature (`one_thread`) live in tests/conftest.py; the dense HTWA oracle is
`tests.htwa_dense`, and the GPU-target compile scripts are `python -m tests.triton_aot` / `tests.info_nce_aot`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# The one tiny model

BERT_VOCAB = 30522  # bert-base-uncased's vocabulary: a tiny model that takes the real tokenizer's ids

TINY_TEXT = {"vocab_size": 120, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "num_sentence_layers": 1, "num_paragraph_layers": 1, "num_cross_layers": 1,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
TINY_VIDEO = {"num_frames": 4, "input_size": (24, 40), "patch_size": (1, 8, 8), "embed_dim": 16,
              "depths": (1, 1, 1, 1, 1, 1), "num_heads": (1, 1, 2, 2, 2, 4), "attention_backend": "reference",
              "drop_path_rate": 0.2, "window_size": ((1, 3, 5), (1, 3, 5), (2, 3, 5), (4, 3, 5), (4, 3, 5), (4, 3, 5)),
              "local_window": 1}
TINY_TOP = {"max_sentence_len": 6, "proj_dim": 16, "pool_kernel": (1, 1)}


def tiny_changes(**changes) -> dict:
    """The changes to the `lfvila-tiny` preset that give the tests' tiny model, merged with `changes` (`video=` /
    `text=` dicts change single sub-fields). In this form a run config's `model.changes` takes it (the CLI tests)."""
    video = dict(TINY_VIDEO, **changes.pop("video", {}))
    text = dict(TINY_TEXT, **changes.pop("text", {}))
    return dict(TINY_TOP, **changes, video=video, text=text)


def tiny_config(preset: str = "lfvila-tiny", **changes):
    """The tests' one tiny model config: the LF-VILA structure (6 video layers, sentence / paragraph / cross-modal
    text layers, both heads) at the smallest size that still exercises it, so a step takes milliseconds on a
    2-core CPU: 4 frames of 24x40 (patch 1x8x8 -> 3x5 tokens, 1 frame per clip), widths 16..128, one block per
    layer, windows 1 -> 4 frames, a 32-wide 120-word text tower (`text={"vocab_size": BERT_VOCAB}` for the real
    tokenizer's ids), 6-token sentences, 16-wide projections. Dropout and drop-path are active, as in training.
    `changes` as `get_config`'s (e.g. `model_type="retrieval"`, `stage=2`, `video={...}`)."""
    from lfvila_model import get_config

    return get_config(preset, **tiny_changes(**changes))


def tiny_model(seed: int = 0, **changes):
    """`build_model(tiny_config(**changes))` with the parameters drawn under `torch.manual_seed(seed)`."""
    from lfvila_model import build_model

    torch.manual_seed(seed)
    return build_model(tiny_config(**changes))


PRESET_INPUT = {"num_frames": 4, "input_size": (48, 80), "patch_size": (1, 2, 2), "attention_backend": "reference"}


def preset_config(preset: str = "lfvila-tiny", **changes):
    """`tiny_config` with the preset's own encoders put back (widths 32..256, 2 blocks per layer, windows
    [2,2,4,8,8,16]x3x5, the MiniLM text tower, 256-wide projections, 2x2 pooling), fed 4 frames of 48x80 (patch
    1x2x2: the preset's 24x40 -> 3x5 grids, 1 frame per clip) and 8-token sentences.

    For the model tests that check the preset itself rather than any model: its structure and parameter names,
    MiniLM and official weight import (which need the 384-wide text tower), the windows of 8 and 16 frames clipped
    to 4 (so the bias-window quirk of spec 1.3 runs), and fused vs plain blocks at the preset's head dim."""
    from lfvila_model import get_config

    base = get_config(preset)
    video = dict(base.video.to_dict(), **PRESET_INPUT)
    video.update(changes.pop("video", {}))
    text = dict(base.text.to_dict(), **changes.pop("text", {}))
    top = {k: getattr(base, k) for k in TINY_TOP}
    top["max_sentence_len"] = 8
    top.update(changes)
    return tiny_config(preset, video=video, text=text, **top)


def make_inputs(cfg, batch: int = 2, seed: int = 0, num_sentences=None):
    """(video (batch, 3, T, H, W), input_ids (batch, M, L), attention_mask) for `cfg`: random pixels, ids in
    1000..4999 after a [CLS], random sentence lengths, and (M > 1) one all-[PAD] sentence in the first item, as
    paragraphs shorter than M sentences have."""
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
        mask[0, -1] = 0  # an all-[PAD] sentence
    ids[mask == 0] = 0
    return video, ids, mask


class RandomSet:
    """N items of (video, input_ids, attention_mask) for `cfg`, fixed by seed; `get_batch` for the trainer."""

    def __init__(self, cfg, n=6, seed=1):
        g = torch.Generator().manual_seed(seed)
        v = cfg.video
        self.video = torch.randn(n, 3, v.num_frames, *v.input_size, generator=g)
        M, L = cfg.num_sentences, cfg.max_sentence_len
        self.ids = torch.randint(5, cfg.text.vocab_size, (n, M, L), generator=g)
        self.ids[:, :, 0] = 1
        self.mask = torch.ones(n, M, L, dtype=torch.long)
        self.mask[:, :, -2:] = 0
        self.ids[self.mask == 0] = 0

    def __len__(self):
        return self.video.shape[0]

    def get_batch(self, idx):
        idx = torch.as_tensor(idx)
        return {"video": self.video[idx], "input_ids": self.ids[idx], "attention_mask": self.mask[idx]}


# ---------------------------------------------------------------------------------------------------------------
# Contrastive-loss features (test_losses.py, test_losses_triton.py, test_losses_chunked.py)


def unit_features(n, d, seed, m=None):
    """fp64 unit-norm features a (n, d) and b (m or n, d), as the model's projection heads produce."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(m or n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def loss_and_grads(fn, a, b, t, upstream, **kw):
    """(loss, da, db, dtemperature) of upstream * fn(a, b, t) on fresh leaf copies."""
    x, y = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_()
    loss = fn(x, y, tt, **kw)
    return (loss.detach(),) + torch.autograd.grad(loss * upstream, (x, y, tt))


def offset_rows_case(backend, n, m, offset, dtype=torch.float64, temperature=0.3, upstream=0.6):
    """The op's rectangular form (the distributed mode's building block: rows of a (n, 24) against all of b (m, 24),
    positive of row i at column i + offset) through `lfvila::info_nce_fwd` with `backend` on `dtype` copies of fp64
    features, and through the fp64 reference. Returns (loss, lse_row, lse_col, da, db) of the op, (loss, da, db) of
    the reference and logsumexp(a b^T / t, 1), the gradients those of upstream * loss."""
    from lfvila_kernels.reference import info_nce_reference

    a, b = unit_features(n, 24, seed=n + m, m=m)
    t = torch.tensor(temperature, dtype=dtype)
    x, y = a.to(dtype, copy=True).requires_grad_(), b.to(dtype, copy=True).requires_grad_()
    loss, lse_row, lse_col = torch.ops.lfvila.info_nce_fwd(x, y, t, offset, False, backend)
    da, db = torch.autograd.grad(loss * upstream, (x, y))
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = info_nce_reference(x2, y2, temperature, symmetric=False, offset=offset)
    rda, rdb = torch.autograd.grad(ref * upstream, (x2, y2))
    got = (loss.detach(), lse_row, lse_col, da, db)
    return got, (ref.detach(), rda, rdb), torch.logsumexp(a @ b.T / temperature, 1)


# ---------------------------------------------------------------------------------------------------------------
# Small real videos (test_embed.py, test_serve.py)

# name -> (frames, height, width, fps): 2-4 s, three frame sizes, one in a sub-folder
VIDEOS = {"a.mp4": (16, 48, 64, 8), "b.mp4": (24, 64, 48, 8), "c.mp4": (12, 32, 32, 4), "sub/d.mp4": (20, 48, 64, 5)}
CORRUPT = "broken.mp4"
SENTENCES = {"a.mp4": ["A red square moves left.", "It stops."], "b.mp4": ["Green light fills the room."],
             "c.mp4": ["Something small flickers.", "Then it fades.", "Dark again."],
             "sub/d.mp4": ["A blue shape grows.", "It shrinks.", "It grows again.", "It leaves.", "The end."]}


def make_videos(root):
    """Writes VIDEOS (random pixels, mpeg4) and a corrupt CORRUPT under `root`; returns `root`."""
    from lfvila_model.data.video import write_video

    rng = np.random.default_rng(0)
    for name, (t, h, w, fps) in VIDEOS.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_video(path, rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), fps=fps, codec="mpeg4")
    with open(os.path.join(root, "a.mp4"), "rb") as f:
        head = f.read(300)
    with open(os.path.join(root, CORRUPT), "wb") as f:
        f.write(head[:40] + bytes(range(256)) * 4)  # an mp4 header, then garbage
    return root


def embed_model(model_type="pretrain", seed=0):
    """A tiny pre-training (stage 1) or retrieval model that takes the real tokenizer's ids (BERT-uncased)."""
    return tiny_model(seed=seed, model_type=model_type, text={"vocab_size": BERT_VOCAB})


def grey_level(i: int) -> int:
    """The grey value of source frame i in `write_grey_video`'s files (the value read back names the frame)."""
    return (6 * i) % 246


def write_grey_video(path, seconds: float = 4.0, fps: int = 10, size=(64, 48), codec: str = "libx264", fmt=None,
                     keyint=None) -> str:
    """Writes `seconds * fps` frames of `size` (W, H) with PyAV, frame i a flat grey `grey_level(i)`, so a cut or
    re-encoded copy says which source frames it holds. `keyint`: x264's keyframe interval (default x264's)."""
    import av

    w, h = size
    c = av.open(str(path), mode="w", format=fmt)
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if codec == "libx264":
        s.options = {"preset": "ultrafast", "threads": "1"}
        if keyint is not None:
            s.options = dict(s.options, **{"x264-params": f"keyint={keyint}:min-keyint={keyint}"})
    for i in range(int(round(seconds * fps))):
        frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), grey_level(i), np.uint8), format="rgb24")
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return str(path)
