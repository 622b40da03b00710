"""Shared helpers of the training tests: a nano LF-VILA (fast on 2 CPU cores, dropout and drop-path active) and an
in-memory dataset of random videos and token ids."""

import torch

from lfvila_model import build_model, get_config

NANO_TEXT = {"vocab_size": 120, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "num_sentence_layers": 1, "num_paragraph_layers": 1, "num_cross_layers": 1,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
NANO_VIDEO = {"num_frames": 4, "input_size": (24, 40), "patch_size": (1, 8, 8), "embed_dim": 16,
              "depths": (1, 1, 1, 1, 1, 1), "num_heads": (1, 1, 2, 2, 2, 4), "attention_backend": "reference",
              "drop_path_rate": 0.2, "window_size": ((1, 3, 5), (1, 3, 5), (2, 3, 5), (4, 3, 5), (4, 3, 5), (4, 3, 5)),
              "local_window": 1}


def nano_config(**changes):
    video = dict(NANO_VIDEO, **changes.pop("video", {}))
    text = dict(NANO_TEXT, **changes.pop("text", {}))
    return get_config("lfvila-tiny", video=video, text=text, max_sentence_len=6, proj_dim=16, pool_kernel=(1, 1),
                      **changes)


def nano_model(seed=0, **changes):
    torch.manual_seed(seed)
    return build_model(nano_config(**changes))


class RandomSet:
    """N items of (video, input_ids, attention_mask), fixed by seed; `get_batch` for the trainer."""

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
