"""Rows regrouped by length inside windows of a few steps, so that a step's rows are of similar length.

Why: a step runs at the length bucket of its longest row (train/loop.py). In a token-balanced SFT mix most rows
are short (VQA-style answers of a few tokens are sampled far more often than long conversations), but almost
every step of 256 rows still holds one long conversation, so it runs at max_length. Here the row stream is read
in windows of `window_rows` rows (a few steps of this process's rows); each window's rows are sorted by length and
cut into chunks of `chunk_rows` (one step's rows on this process), and the chunks follow in an order drawn from
(seed, window number). Every row is used once, in the same windows as without grouping; only the order inside a
window changes. The chunk order is the same on every process (same seed, same window number, same number of
chunks), so at each step every process contributes its window's rows of the same length rank.

State: where the current window started in the parent stream, how many of its rows were returned, the window's
number and its sizes. A restore re-reads the window from its start and skips what was returned, so resuming
gives the same rows in the same order. A window holds its prepared rows (images included) in host memory.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class LengthGroupedIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, *, window_rows: int, chunk_rows: int, seed: int):
        super().__init__(parent)
        if chunk_rows <= 0 or window_rows <= 0 or window_rows % chunk_rows:
            raise ValueError(f"length grouping: window_rows={window_rows} must be a positive multiple of "
                             f"chunk_rows={chunk_rows}")
        self.window_rows, self.chunk_rows, self.seed = int(window_rows), int(chunk_rows), int(seed)

    def __iter__(self) -> "LengthGroupedIterator":
        return LengthGroupedIterator(self._parent.__iter__(), self)


def check_group_steps(steps) -> int:
    """`length_group_steps` as an int >= 0 (0: no grouping), or a ValueError naming the key."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"length_group_steps must be an integer >= 0, got {steps!r}")
    return int(steps)


def window_order(lengths: list[int], chunk_rows: int, seed: int, window_index: int) -> list[int]:
    """Indices of a window's rows: sorted by length (ties by position), cut into chunks of chunk_rows (the last
    may be short), the chunks in a random order fixed by (seed, window_index)."""
    ranked = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = [ranked[i:i + chunk_rows] for i in range(0, len(ranked), chunk_rows)]
    picks = np.random.default_rng([seed, window_index]).permutation(len(chunks))
    return [i for c in picks for i in chunks[c]]


class LengthGroupedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: LengthGroupedIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._window_rows, self._chunk_rows = spec.window_rows, spec.chunk_rows
        self._window_start = None  # parent state where the current window began (None: no window read yet)
        self._window_index = -1
        self._rows: list[dict] = []
        self._order: list[int] = []
        self._returned = 0

    def _read_window(self, window_rows: int, chunk_rows: int) -> None:
        self._window_rows, self._chunk_rows = window_rows, chunk_rows
        self._window_start = self._parent.get_state()
        self._rows = []
        for _ in range(self._window_rows):
            try:
                self._rows.append(next(self._parent))
            except StopIteration:
                break
        lengths = [int(r.get("length", 0)) for r in self._rows]  # skip / drop markers have none: sorted first
        self._order = window_order(lengths, chunk_rows, self._spec.seed, self._window_index)
        self._returned = 0

    def __next__(self) -> dict[str, Any]:
        if self._returned >= len(self._order):
            self._window_index += 1
            self._read_window(self._spec.window_rows, self._spec.chunk_rows)
            if not self._rows:
                self._window_index -= 1  # nothing more: the state stays where the stream ended
                raise StopIteration
        row = self._rows[self._order[self._returned]]
        self._returned += 1
        return row

    def get_state(self) -> dict[str, Any]:
        if self._window_start is None or self._returned >= len(self._order):  # between windows
            return {"window_start": self._parent.get_state(), "returned": 0, "window_index": self._window_index + 1,
                    "window_rows": self._spec.window_rows, "chunk_rows": self._spec.chunk_rows}
        return {"window_start": self._window_start, "returned": self._returned, "window_index": self._window_index,
                "window_rows": self._window_rows, "chunk_rows": self._chunk_rows}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"window_start", "returned", "window_index", "window_rows", "chunk_rows"} - set(state)
        if missing:
            raise ValueError(f"length grouping: the saved data state lacks {sorted(missing)} (saved without "
                             "length grouping?)")
        self._parent.set_state(state["window_start"])
        self._window_index = int(state["window_index"])
        self._rows, self._order, self._returned, self._window_start = [], [], 0, None
        if int(state["returned"]) > 0:  # the window in progress is cut as it was, even if the config changed since
            self._read_window(int(state["window_rows"]), int(state["chunk_rows"]))
            self._returned = int(state["returned"])
        else:
            self._window_index -= 1  # the next __next__ reads window `window_index`
