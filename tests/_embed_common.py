"""Shared helpers of the embed / search / serve tests: a folder of tiny real videos (several lengths and frame
sizes, one corrupt file) and a nano model whose text tower takes the real BERT-uncased token ids."""

import os

import numpy as np

from _train_common import nano_model
from lfvila_model.data.video import write_video

# name -> (frames, height, width, fps): 2-4 s, three frame sizes, one in a sub-folder
VIDEOS = {"a.mp4": (16, 48, 64, 8), "b.mp4": (24, 64, 48, 8), "c.mp4": (12, 32, 32, 4), "sub/d.mp4": (20, 48, 64, 5)}
CORRUPT = "broken.mp4"
SENTENCES = {"a.mp4": ["A red square moves left.", "It stops."], "b.mp4": ["Green light fills the room."],
             "c.mp4": ["Something small flickers.", "Then it fades.", "Dark again."],
             "sub/d.mp4": ["A blue shape grows.", "It shrinks.", "It grows again.", "It leaves.", "The end."]}


def make_videos(root):
    """Writes VIDEOS (random pixels, mpeg4) and a corrupt CORRUPT under `root`; returns `root`."""
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
    """A nano pre-training (stage 1) or retrieval model with the full BERT-uncased vocabulary."""
    return nano_model(seed=seed, model_type=model_type, text={"vocab_size": 30522})
