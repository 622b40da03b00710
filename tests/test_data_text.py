"""Paragraph tokenisation: merge/pad to M sentences (spec 2), 50 tokens each, BERT uncased ids."""

import os

import pytest
import torch

from lfvila_model.data import text as T


@pytest.fixture(scope="module")
def vocab():
    # token -> id read straight from vocab.txt (line number), independent of the tokenizer's own code
    with open(os.path.join(T.default_tokenizer_dir(), "vocab.txt"), encoding="utf-8") as f:
        return {tok.rstrip("\n"): i for i, tok in enumerate(f)}


@pytest.fixture(scope="module")
def ptok():
    return T.ParagraphTokenizer(num_sentences=4, max_length=10)


def test_merge_smallest_adjacent_pair_hand_case():
    # pair lengths 5, 3, 5, 4 -> join "b"+"cc"; then 8, 7, 4 -> join "ddd"+"e"
    assert T.merge_sentences(["aaaa", "b", "cc", "ddd", "e"], 3) == ["aaaa", "b cc", "ddd e"]
    assert T.merge_sentences(["a", "b", "c"], 2) == ["a b", "c"]  # tie: leftmost pair
    assert T.merge_sentences(["x", "yy"], 4) == ["x", "yy"]  # short paragraphs are not merged
    assert T.merge_sentences(["a", "bb", "c", "dd"], 1) == ["a bb c dd"]
    with pytest.raises(ValueError, match="max_sentences"):
        T.merge_sentences(["a"], 0)


def test_token_ids_match_vocab_and_padding_rows(ptok, vocab):
    out = ptok(["A RED circle.", "it moves left"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (4, 10) and mask.shape == (4, 10) and ids.dtype == torch.long
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    row0 = [cls, vocab["a"], vocab["red"], vocab["circle"], vocab["."], sep] + [pad] * 4  # uncased
    row1 = [cls, vocab["it"], vocab["moves"], vocab["left"], sep] + [pad] * 5
    assert ids[0].tolist() == row0 and mask[0].tolist() == [1] * 6 + [0] * 4
    assert ids[1].tolist() == row1 and mask[1].tolist() == [1] * 5 + [0] * 5
    # missing sentences are all-[PAD] with an all-zero mask
    assert (ids[2:] == pad).all() and (mask[2:] == 0).all()
    assert out["num_sentences"] == 2


def test_truncation_keeps_sep_and_merge_applies(ptok, vocab):
    long = " ".join(["red"] * 30)
    out = ptok([long])
    assert out["input_ids"][0].tolist() == [vocab["[CLS]"]] + [vocab["red"]] * 8 + [vocab["[SEP]"]]
    assert out["attention_mask"][0].tolist() == [1] * 10
    five = ptok(["a", "b", "cc", "d", "eee"])  # pairs 2,3,3,4 -> "a b"
    assert five["num_sentences"] == 4
    assert five["input_ids"][0].tolist()[:4] == [vocab["[CLS]"], vocab["a"], vocab["b"], vocab["[SEP]"]]


def test_single_string_and_cache_consistency(vocab):
    t1 = T.ParagraphTokenizer(num_sentences=1, max_length=50, cache=True)
    t2 = T.ParagraphTokenizer(num_sentences=1, max_length=50, cache=False)
    a, b = t1("the cat."), t2(["the cat."])
    assert a["input_ids"].shape == (1, 50)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(t1("the cat.")["input_ids"], a["input_ids"])
    assert a["input_ids"][0, :4].tolist() == [vocab["[CLS]"], vocab["the"], vocab["cat"], vocab["."]]


def test_argument_checks(ptok):
    with pytest.raises(ValueError, match="num_sentences must be a positive integer"):
        T.ParagraphTokenizer(num_sentences=0)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        T.ParagraphTokenizer(max_length=1)
    with pytest.raises(TypeError, match="sentences must be"):
        ptok([1, 2])
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer("/nonexistent/tokenizer")
