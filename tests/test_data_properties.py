"""Property checks (hypothesis) of frame sampling, paragraph merging and ranks, against their definitions."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lfvila_model.data import text as T
from lfvila_model.data import video as V
from lfvila_model.eval import retrieval as R


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), f=st.integers(3, 64), seed=st.integers(0, 2**31))
def test_train_indices_within_jitter_bounds(n, f, seed):
    idx = V.downstream_indices(n, f, train=True, rng=np.random.default_rng(seed))
    interval = n // (f - 1)
    assert idx.shape == (f,) and (np.diff(idx) >= 0).all()
    assert 0 <= idx[0] <= min(interval, n - 1) and max(n - 1 - interval, 0) <= idx[-1] <= n - 1
    ev = V.downstream_indices(n, f, train=False)
    assert ev[0] == 0 and ev[-1] == n - 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 16))
def test_segment_starts_are_floors_of_equal_segments(n, k):
    idx = V.clip_segment_indices(n, k)
    # start of segment j of k equal segments of [0, n): floor(j * n / k), computed in exact integer arithmetic;
    # float linspace may land one below an exact integer, so allow that one rounding step
    exact = np.array([j * n // k for j in range(k)])
    assert ((idx == exact) | (idx == exact - 1)).all() and idx[0] == 0 and idx[-1] <= n - 1


@settings(max_examples=80, deadline=None)
@given(sents=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=0, max_size=10),
       m=st.integers(1, 5))
def test_merge_preserves_text_and_count(sents, m):
    out = T.merge_sentences(sents, m)
    assert len(out) == min(len(sents), m)
    assert " ".join(out) == " ".join(sents)  # only joins adjacent sentences, in order, with one space


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31), levels=st.integers(2, 5))
def test_ranks_match_a_pessimistic_sort(n, seed, levels):
    # few distinct values, so ties are common
    sim = np.random.default_rng(seed).integers(0, levels, (n, n)).astype(float)
    ranks = R.ranks_from_similarity(sim)
    for i in range(n):
        # sort candidates by score descending, the true one last among equals: its 1-based position
        order = sorted(range(n), key=lambda j: (-sim[i, j], j == i))
        assert ranks[i] == order.index(i) + 1
