"""Rows regrouped by length within windows: every row once, similar lengths per step, exact resume."""

import json

import grain
import numpy as np
import pytest

from ghostvis_jax.data.length_grouping import LengthGroupedIterDataset, window_order


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    # Mostly short rows and a few long ones, as a token-balanced SFT mix draws them.
    lengths = np.where(rng.random(n) < 0.9, rng.integers(80, 200, n), rng.integers(600, 2000, n))
    return [{"id": i, "length": int(n_)} for i, n_ in enumerate(lengths)]


def _grouped(rows, window_rows=32, chunk_rows=8, seed=3):
    parent = grain.MapDataset.source(rows).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    return LengthGroupedIterDataset(parent, window_rows=window_rows, chunk_rows=chunk_rows, seed=seed)


def test_each_window_is_a_permutation_in_length_ranked_chunks():
    rows = _rows(100)
    out = [r["id"] for r in _grouped(rows)]
    assert sorted(out) == list(range(100))  # nothing lost or repeated
    for w in range(0, 100, 32):  # rows never leave their window
        assert sorted(out[w:w + 32]) == list(range(w, min(w + 32, 100)))
        window = sorted(rows[w:w + 32], key=lambda r: (r["length"], r["id"]))
        ranked = [[r["id"] for r in window[i:i + 8]] for i in range(0, len(window), 8)]
        chunks = [out[i:i + 8] for i in range(w, min(w + 32, 100), 8)]
        assert sorted(chunks) == sorted(ranked)  # each step's rows: one run of the window's length order


def test_steps_of_a_window_get_short_maxima():
    rows = _rows(4096, seed=1)
    plain = [max(r["length"] for r in rows[i:i + 64]) for i in range(0, 4096, 64)]
    out = list(_grouped(rows, window_rows=256, chunk_rows=64))
    grouped = [max(r["length"] for r in out[i:i + 64]) for i in range(0, 4096, 64)]
    assert sum(m <= 256 for m in plain) <= 2  # a step of 64 rows nearly always holds a long row ...
    assert sum(m <= 256 for m in grouped) >= 0.6 * len(grouped)  # ... grouped, most steps hold only short ones


def test_chunk_order_is_the_same_on_every_process():
    a = window_order([5, 1, 9, 3, 7, 2], chunk_rows=2, seed=0, window_index=4)
    b = window_order([50, 60, 10, 30, 20, 40], chunk_rows=2, seed=0, window_index=4)
    rank = lambda lengths, order: [sorted(lengths).index(lengths[i]) // 2 for i in order]  # noqa: E731
    assert rank([5, 1, 9, 3, 7, 2], a) == rank([50, 60, 10, 30, 20, 40], b)  # same length rank per step
    assert window_order([5, 1, 9, 3, 7, 2], 2, 0, 5) != a or window_order([5, 1, 9, 3, 7, 2], 2, 0, 6) != a


def test_resume_at_every_row_gives_the_same_rows():
    rows = _rows(70)
    full = [r["id"] for r in _grouped(rows)]
    it = iter(_grouped(rows))
    for i in range(len(full)):
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(_grouped(rows))
        fresh.set_state(state)
        assert [r["id"] for r in fresh] == full[i:], i
        next(it)


def test_a_window_in_progress_resumes_with_the_sizes_it_was_cut_with():
    rows = _rows(96)
    full = [r["id"] for r in _grouped(rows, window_rows=32, chunk_rows=8)]
    it = iter(_grouped(rows, window_rows=32, chunk_rows=8))
    for _ in range(40):  # into the second window
        next(it)
    resized = iter(_grouped(rows, window_rows=16, chunk_rows=4))
    resized.set_state(it.get_state())
    rest = [r["id"] for r in resized]
    assert rest[:24] == full[40:64]  # the rest of the window as it was cut
    assert sorted(rest[24:]) == list(range(64, 96)) and rest[24:] != full[64:]  # then windows of the new sizes


def test_bad_sizes_and_a_state_without_grouping_are_refused():
    with pytest.raises(ValueError, match="window_rows=30 must be a positive multiple of chunk_rows=8"):
        _grouped(_rows(10), window_rows=30)
    plain = grain.MapDataset.source(_rows(10)).to_iter_dataset()
    it = iter(plain)
    next(it)
    with pytest.raises(ValueError, match="saved without length grouping"):
        iter(_grouped(_rows(10))).set_state(it.get_state())
