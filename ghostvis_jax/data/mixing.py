"""Token-balanced mixing: recipe weights are shares of answer tokens, so a dataset is sampled with
probability proportional to weight / mean answer tokens.

`TokenBalancedSelection` is a grain `DatasetSelectionMap` (for `MapDataset.select_from_datasets`): element i
-> (dataset k, index within k). It is stratified by blocks: each block of `block_size` elements holds
floor(block_size * p_k) elements of dataset k plus a seeded draw for the remainder, in a seeded random order.
That keeps the achieved shares on target even for datasets with small probabilities (a 60-token dataset
next to a 2-token one gets ~3% of rows), where independent draws would miss by several points in a few
thousand samples. Everything is a pure function of (seed, index): stateless, picklable, resumable.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Sequence

import numpy as np
from grain.transforms import DatasetSelectionMap

from ghostvis_jax.data.chat import answer_token_count
from ghostvis_jax.data.sources import EmptyDatasetError
from ghostvis_jax.data.tasks import SkipRow

_MEAN_TOKENS_CACHE: dict[str, float] = {}


def _conversation_for_estimate(source, index: int):
    if hasattr(source, "conversation"):  # TaskSource: skip image decoding
        try:
            return source.conversation(index, decode_images=False)
        except SkipRow:
            return None
    out = source[index]
    return None if "skipped" in out else out


def estimate_mean_answer_tokens(source, tokenizer, *, name: str, num_samples: int = 256, seed: int = 0,
                                cache_dir: str | None = None) -> float:
    """Mean answer tokens per example over a seeded sample of rows (cached in memory and in `cache_dir`)."""
    key_text = f"{name}|{source!r}|{len(source)}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|" \
               f"{num_samples}|{seed}"
    key = hashlib.sha1(key_text.encode()).hexdigest()[:16]
    if key in _MEAN_TOKENS_CACHE:
        return _MEAN_TOKENS_CACHE[key]
    cache_file = os.path.join(cache_dir, f"answer_tokens_{key}.json") if cache_dir else None
    if cache_file and os.path.exists(cache_file):
        with open(cache_file) as f:
            value = float(json.load(f)["mean_answer_tokens"])
        _MEAN_TOKENS_CACHE[key] = value
        return value
    n = len(source)
    rng = np.random.default_rng([seed, 0x70C])
    indices = rng.choice(n, size=min(num_samples, n), replace=False)
    counts = []
    for i in indices:
        conv = _conversation_for_estimate(source, int(i))
        if conv is not None:
            counts.append(answer_token_count(tokenizer, conv))
    if not counts:
        raise EmptyDatasetError(f"dataset {name!r}: none of {len(indices)} sampled rows is usable")
    value = float(np.mean(counts))
    _MEAN_TOKENS_CACHE[key] = value
    if cache_file:
        os.makedirs(cache_dir, exist_ok=True)
        with open(cache_file, "w") as f:
            json.dump({"dataset": name, "mean_answer_tokens": value, "samples": len(counts), "key": key_text}, f)
    return value


def token_balanced_probabilities(weights: dict[str, float], mean_answer_tokens: dict[str, float]) -> dict[str, float]:
    """p_k proportional to weight_k / mean_answer_tokens_k."""
    raw = {k: float(weights[k]) / max(float(mean_answer_tokens[k]), 1e-9) for k in weights}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


class TokenBalancedSelection(DatasetSelectionMap):
    """Block-stratified, seeded mixture selection over datasets that are infinite (repeated)."""

    def __init__(self, probabilities: Sequence[float], *, seed: int, block_size: int = 1000,
                 length: int = 2**62):
        p = np.asarray(probabilities, np.float64)
        if p.ndim != 1 or len(p) == 0 or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"bad mixture probabilities {probabilities}")
        self._p = p / p.sum()
        self._seed = int(seed)
        self._block = int(block_size)
        self._length = int(length)
        self._base = np.floor(self._block * self._p).astype(np.int64)
        self._frac = self._block * self._p - self._base
        self._init_memo()

    def _init_memo(self):
        self._lock = threading.Lock()
        self._offsets = [np.zeros(len(self._p), np.int64)]  # cumulative counts before block b
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_lock", "_offsets", "_block_cache"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_memo()

    def __len__(self) -> int:
        return self._length

    def _counts(self, block: int) -> np.ndarray:
        counts = self._base.copy()
        leftover = self._block - int(counts.sum())
        if leftover:
            rng = np.random.default_rng([self._seed, block, 0])
            extra = rng.choice(len(self._p), size=leftover, replace=False, p=self._frac / self._frac.sum())
            counts[extra] += 1
        return counts

    def _offset(self, block: int) -> np.ndarray:
        with self._lock:
            while len(self._offsets) <= block:
                b = len(self._offsets) - 1
                self._offsets.append(self._offsets[b] + self._counts(b))
            return self._offsets[block]

    def _labels_and_ranks(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._block_cache.get(block)
        if cached is not None:
            return cached
        counts = self._counts(block)
        labels = np.repeat(np.arange(len(self._p)), counts)
        labels = np.random.default_rng([self._seed, block, 1]).permutation(labels)
        ranks = np.empty(self._block, np.int64)
        for k in range(len(self._p)):
            where = np.nonzero(labels == k)[0]
            ranks[where] = np.arange(len(where))
        with self._lock:
            if len(self._block_cache) > 64:
                self._block_cache.clear()
            self._block_cache[block] = (labels, ranks)
        return labels, ranks

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"mixture index {index} out of range")
        block, pos = divmod(int(index), self._block)
        labels, ranks = self._labels_and_ranks(block)
        k = int(labels[pos])
        return k, int(self._offset(block)[k] + ranks[pos])


def answer_token_shares(tokens_per_dataset: dict[str, float]) -> dict[str, float]:
    total = sum(tokens_per_dataset.values())
    return {k: (v / total if total else 0.0) for k, v in tokens_per_dataset.items()}


def format_mix_report(target_weights: dict[str, float], counts: dict) -> str:
    """A table per dataset: target share, achieved answer-token share, rows used, rows skipped / dropped.

    `counts` is a data iterator's `counts()` (keys rows, answer_tokens, skipped, dropped)."""
    shares = answer_token_shares(counts.get("answer_tokens", {}))
    lines = [f"{'dataset':28s} {'target':>7s} {'achieved':>9s} {'rows':>8s} {'skipped':>8s} {'dropped':>8s}"]
    for name, w in target_weights.items():
        skipped = sum(counts.get("skipped", {}).get(name, {}).values())
        dropped = sum(counts.get("dropped", {}).get(name, {}).values())
        lines.append(f"{name:28s} {w:7.3f} {shares.get(name, 0.0):9.3f} {counts.get('rows', {}).get(name, 0):8d} "
                     f"{skipped:8d} {dropped:8d}")
    return "\n".join(lines)
