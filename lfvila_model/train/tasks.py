"""What one training step computes, per task: batch assembly and the loss (the `Trainer` does the rest).

| task | model | batch | loss |
| --- | --- | --- | --- |
| `PretrainTask(stage=1)` | `LFVILAPretrain` | video, input_ids, attention_mask | VPC + w MTC (MTC indices for the global batch) |
| `PretrainTask(stage=2)` | `LFVILAPretrain` stage 2 | + MLM masking (15 %, 80/10/10) | MLM + 10 VTM |
| `RetrievalTask` | `LFVILARetrieval` | video, paragraph | VPC |
| `QAMultichoiceTask` | `LFVILAQAMultichoice` | video, (B, K, M, L) candidates, labels[, span_labels] | CE + span |
| `ClassificationTask` | `LFVILAQAClassification` / `LFVILAVideoClassification` | video[, text], labels | CE |

Unreadable videos: an item whose video cannot be read is replaced by the next readable index (so every rank keeps
its batch size, which the all-gathers need; `data.loader.read_batch`, in a DataLoader worker or here), and counted
by a `SkipTracker` (`Task.take`, in the training process) that stops the run past `max_skip_fraction`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import torch

from ..data.datasets import SkipTracker, collate

__all__ = ["Task", "PretrainTask", "RetrievalTask", "QAMultichoiceTask", "ClassificationTask", "mask_tokens",
           "to_device", "TASKS"]


def to_device(batch: dict, device) -> dict:
    # non_blocking overlaps the copy with compute only from pinned memory (the CUDA loader pins batches)
    nb = torch.device(device).type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, mask_token_id: int,
                special_ids: Sequence[int], generator: Optional[torch.Generator] = None, prob: float = 0.15):
    """BERT masking (spec 3.3, `src/utils/data.py`): each real, non-special token is chosen with `prob`; chosen
    tokens become [MASK] (80 %), a random token (10 %) or stay (10 %).

    Args:
        input_ids, attention_mask: `(..., L)`.
    Returns:
        (masked input_ids, labels) with labels = the original id where chosen, -100 elsewhere.
    """
    g = generator
    ids = input_ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    can = (attention_mask > 0) & ~special
    chosen = (torch.rand(ids.shape, generator=g) < prob) & can
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(ids.shape, generator=g)
    ids[chosen & (r < 0.8)] = mask_token_id
    rnd = chosen & (r >= 0.8) & (r < 0.9)
    ids[rnd] = torch.randint(vocab_size, ids.shape, generator=g)[rnd]
    return ids, labels


class Task(abc.ABC):
    """Base: batch assembly with skip replacement; subclasses define `loss`."""

    max_skip_fraction: float = 0.01
    max_replacements: int = 20

    def __init__(self, max_skip_fraction: float = 0.01):
        self.max_skip_fraction = max_skip_fraction
        self.tracker: Optional[SkipTracker] = None
        self.data_size: Optional[int] = None  # the training set's length (the trainer sets it)

    def batch(self, data, indices: list, device) -> dict:
        """The batch of `indices`, read in this process (the trainer reads through `data.loader.TrainInput`)."""
        if hasattr(data, "get_batch"):
            return to_device(data.get_batch(indices), device)
        from ..data.loader import read_batch

        return self.take(read_batch(data, indices, max_replacements=self.max_replacements), device, len(data))

    def take(self, batch: dict, device, total: Optional[int] = None) -> dict:
        """A batch from `data.loader.read_batch` (possibly built in a worker): its skipped items are counted
        (`SkipTracker`, raising past `max_skip_fraction` of `total` items), then it goes to `device`."""
        skipped = batch.pop("skipped", None)
        if skipped is not None:
            if self.tracker is None:
                self.tracker = SkipTracker(total or self.data_size, self.max_skip_fraction)
            for s in skipped:
                self.tracker.update({"skipped": [s]})
        if "error" in batch:
            raise RuntimeError(batch["error"])
        return to_device(batch, device)

    @abc.abstractmethod
    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        """The task's loss terms for one batch (each subclass defines its own)."""


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


class PretrainTask(Task):
    """Pre-training, stage 1 (VPC + MTC) or stage 2 (MLM + VTM)."""

    def __init__(self, config, stage: int = 1, tokenizer=None, max_skip_fraction: float = 0.01):
        super().__init__(max_skip_fraction)
        self.config = config
        self.stage = stage
        if stage == 2:
            if tokenizer is None:
                from ..data.text import load_tokenizer

                tokenizer = load_tokenizer()
            self.mask_id = tokenizer.mask_token_id
            self.special = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
                            if t is not None]
            self.vocab = config.text.vocab_size

    def loss(self, model, batch, generator):
        video, ids, mask = batch["video"], batch["input_ids"], batch["attention_mask"]
        if self.stage == 1:
            from lfvila_kernels import sample_mtc_indices

            c = self.config
            idx = sample_mtc_indices(ids.shape[0] * _world(), c.num_clips, c.mtc_num_key, c.mtc_num_value,
                                     generator=generator)
            return model(video, ids, mask, mtc_indices=idx)
        masked, labels = mask_tokens(ids.cpu(), mask.cpu(), self.vocab, self.mask_id, self.special, generator)
        return model(video, masked.to(ids.device), mask, mlm_labels=labels.to(ids.device))


class RetrievalTask(Task):
    def loss(self, model, batch, generator):
        return model(batch["video"], batch["input_ids"], batch["attention_mask"])


class QAMultichoiceTask(Task):
    def loss(self, model, batch, generator):
        return model(batch["video"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                     span_labels=batch.get("span_labels"))


class ClassificationTask(Task):
    """QA as classification (text + video) or video-only classification (no `input_ids` in the batch)."""

    def loss(self, model, batch, generator):
        if "input_ids" in batch:
            return model(batch["video"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        return model(batch["video"], labels=batch["labels"])


TASKS: dict[str, Any] = {
    "pretrain": PretrainTask,
    "retrieval": RetrievalTask,
    "qa_multichoice": QAMultichoiceTask,
    "qa_classification": ClassificationTask,
    "video_classification": ClassificationTask,
}
