"""Per-example preparation (decode, augment, render, pad) and the fixed-shape batcher with an image budget.

`PrepareExample` runs inside grain's read threads / worker processes (module-level and picklable). Its output
is either a prepared row or a marker `{"skipped"|"dropped": reason, "dataset": name}`; markers travel to the
batcher, which runs in the main process and keeps the per-dataset counts inside the checkpointable state.

`ImageBudgetBatchIterDataset` builds batches of exactly `batch_size` rows and `max_images` image entries.
A row whose images do not fit the rest of the budget is carried over to the next batch (the rest of the
current batch is padded with empty rows); a row with more images than the whole budget is dropped and counted.
The state it saves is the parent state from before the carried row was read, so a restore re-reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from ghostvis_jax.data import chat
from ghostvis_jax.data.images import ImageDecodeError, preprocess_image
from ghostvis_jax.data.sources import EmptyDatasetError

# Rows read in a row without a usable one before the batcher gives up: a dataset whose every row is skipped or
# dropped (all images unreadable, all too long, ...) would otherwise be repeated forever without a batch.
MAX_UNUSABLE_IN_A_ROW = 1000

# Tasks whose answers survive a horizontal flip. Everything else may mention text, charts or left/right.
FLIP_SAFE_TASKS = frozenset({"shapes_vqa"})


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What preprocessing needs from the tower config (duck-types `SiglipConfig`)."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_vision_config(cls, v) -> "ImageSpec":
        return cls(int(v.image_size), tuple(float(x) for x in v.image_mean), tuple(float(x) for x in v.image_std))


class PrepareExample(grain.transforms.RandomMap):
    """conversation -> {input_ids, targets, loss_mask [T], pixel_values [n, H, W, 3], num_images, length (tokens
    before the padding), dataset}."""

    def __init__(self, tokenizer, image_spec: ImageSpec, num_image_tokens: int, max_length: int, *,
                 augment: bool = False, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self.augment = bool(augment)
        self.system_prompt = system_prompt
        self.pad_id = chat.special_ids(tokenizer).pad

    def random_map(self, conversation: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        name = conversation.get("dataset", "?")
        if "skipped" in conversation:
            return conversation
        try:
            rendered = chat.render_conversation(self.tokenizer, conversation, self.num_image_tokens,
                                                max_length=self.max_length, system_prompt=self.system_prompt)
        except chat.RenderError as e:
            return {"dropped": e.reason, "dataset": name}
        allow_flip = self.augment and conversation.get("task") in FLIP_SAFE_TASKS
        size = self.image_spec.image_size
        pixels = np.zeros((rendered.num_images, size, size, 3), np.float32)
        try:
            for i, image in enumerate(conversation["images"]):
                pixels[i] = preprocess_image(image, self.image_spec, rng=rng, augment=self.augment,
                                             allow_flip=allow_flip)
        except ImageDecodeError:
            return {"skipped": "unreadable image", "dataset": name}
        row = chat.to_training_arrays(rendered, self.max_length, self.pad_id)
        row.update(pixel_values=pixels, num_images=rendered.num_images, length=len(rendered.input_ids),
                   dataset=name)
        return row


def _empty_counts() -> dict[str, Any]:
    return {"rows": {}, "answer_tokens": {}, "skipped": {}, "dropped": {}, "padding_rows": 0, "batches": 0}


class ImageBudgetBatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, *, batch_size: int, max_images: int, max_length: int,
                 image_size: int, pad_id: int, fingerprint: str = "", also_accepts: tuple[str, ...] = ()):
        super().__init__(parent)
        self.batch_size, self.max_images, self.max_length = int(batch_size), int(max_images), int(max_length)
        self.image_size, self.pad_id = int(image_size), int(pad_id)
        self.fingerprint = fingerprint
        self.also_accepts = tuple(also_accepts)  # states saved by older versions' fingerprints of the same stream

    def __iter__(self) -> "ImageBudgetBatchIterator":
        return ImageBudgetBatchIterator(self._parent.__iter__(), self)


class ImageBudgetBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: ImageBudgetBatchIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._pending: tuple[dict, Any] | None = None  # (row, parent state before reading it)
        self._counts = _empty_counts()
        self._exhausted = False
        self._unusable_streak = 0

    def _count(self, kind: str, dataset: str, reason: str):
        per = self._counts[kind].setdefault(dataset, {})
        per[reason] = per.get(reason, 0) + 1

    def _pull(self) -> tuple[dict, Any] | None:
        if self._pending is not None:
            out, self._pending = self._pending, None
            return out
        state = self._parent.get_state()
        try:
            return next(self._parent), state
        except StopIteration:
            return None

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._spec
        if self._exhausted:
            raise StopIteration
        rows: list[dict] = []
        n_images = 0
        while len(rows) < s.batch_size:
            pulled = self._pull()
            if pulled is None:
                self._exhausted = True
                break
            row, state = pulled
            name = row.get("dataset", "?")
            if "skipped" in row or "dropped" in row or row["num_images"] > s.max_images:
                if "skipped" in row:
                    self._count("skipped", name, row["skipped"])
                elif "dropped" in row:
                    self._count("dropped", name, row["dropped"])
                else:
                    self._count("dropped", name, "more images than max_images_per_batch")
                self._unusable_streak += 1
                if self._unusable_streak >= MAX_UNUSABLE_IN_A_ROW:
                    raise EmptyDatasetError(
                        f"no usable row in the last {self._unusable_streak} rows read (skipped: "
                        f"{self._counts['skipped']}, dropped: {self._counts['dropped']}); a dataset whose every "
                        "row is unreadable or too long would repeat forever without a batch")
                continue
            self._unusable_streak = 0
            if n_images + row["num_images"] > s.max_images:
                self._pending = (row, state)
                break
            rows.append(row)
            n_images += row["num_images"]
        if not rows:
            raise StopIteration
        return self._assemble(rows)

    def _assemble(self, rows: list[dict]) -> dict[str, np.ndarray]:
        s = self._spec
        B, T = s.batch_size, s.max_length
        batch = {
            "input_ids": np.full((B, T), s.pad_id, np.int32),
            "targets": np.full((B, T), s.pad_id, np.int32),
            "loss_mask": np.zeros((B, T), np.float32),
            "pixel_values": np.zeros((s.max_images, s.image_size, s.image_size, 3), np.float32),
            "num_images": np.zeros((B,), np.int32),
            "lengths": np.zeros((B,), np.int32),  # tokens before the padding (0: an empty row)
        }
        k = 0
        for b, row in enumerate(rows):
            for key in ("input_ids", "targets", "loss_mask"):
                batch[key][b] = row[key]
            n = row["num_images"]
            batch["pixel_values"][k:k + n] = row["pixel_values"]
            batch["num_images"][b] = n
            batch["lengths"][b] = row["length"]
            k += n
            c = self._counts
            c["rows"][row["dataset"]] = c["rows"].get(row["dataset"], 0) + 1
            c["answer_tokens"][row["dataset"]] = c["answer_tokens"].get(row["dataset"], 0) + int(row["loss_mask"].sum())
        self._counts["padding_rows"] += B - len(rows)
        self._counts["batches"] += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        parent_state = self._pending[1] if self._pending is not None else self._parent.get_state()
        return {"parent": parent_state, "counts": _copy(self._counts), "exhausted": self._exhausted,
                "fingerprint": self._spec.fingerprint}

    def set_state(self, state: dict[str, Any]):
        if state.get("fingerprint") not in (self._spec.fingerprint, *self._spec.also_accepts):
            raise ValueError("data iterator state was saved with a different data config / seed / process count "
                             f"(fingerprint {state.get('fingerprint')!r}, now {self._spec.fingerprint!r})")
        self._parent.set_state(state["parent"])
        self._pending = None
        self._counts = _copy(state["counts"])
        self._exhausted = bool(state.get("exhausted", False))

    def counts(self) -> dict[str, Any]:
        return _copy(self._counts)


TOKEN_KEYS = ("input_ids", "targets", "loss_mask")  # the batch arrays whose last axis is the token position


def check_length_buckets(buckets, max_length: int) -> tuple[int, ...]:
    """`length_buckets` as a tuple of increasing integers in (0, max_length), or a ValueError naming the key."""
    out = tuple(buckets) if isinstance(buckets, (tuple, list)) else None
    if (out is None or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in out)
            or any(b <= 0 or b >= max_length for b in out) or list(out) != sorted(set(out))):
        raise ValueError(f"length_buckets must be increasing integers between 0 and max_length ({max_length}), "
                         f"exclusive, got {buckets!r}")
    return tuple(int(b) for b in out)


def bucket_length(needed: int, buckets, max_length: int) -> int:
    """The shortest of `buckets` (then `max_length`) that holds `needed` tokens: the step's sequence length when
    batches are cut to length buckets (each length compiles the step once)."""
    if needed > max_length:
        raise ValueError(f"a row of {needed} tokens is longer than max_length {max_length}")
    return min([b for b in buckets if b >= needed] or [max_length])


def trim_to_length(batch: dict[str, Any], length: int) -> dict[str, Any]:
    """The batch with its token arrays cut to their first `length` positions. Only padding is cut: rows are padded
    at the end, and `lengths` says where each row's tokens stop (a longer row is refused, never truncated)."""
    longest = int(np.max(batch["lengths"], initial=0))
    if longest > length:
        raise ValueError(f"cannot cut the batch to {length} tokens: a row holds {longest}")
    return {k: (v[..., :length] if k in TOKEN_KEYS else v) for k, v in batch.items()}


def join_batches(batches: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """Consecutive batches joined f at a time, for the largest f <= most that divides their number: a step of rows
    cut to a bucket f times shorter than max_length runs as f times fewer, larger micro-batches (the same tokens
    per micro-batch, so about the same memory). Rows keep their order; each joined batch's real images come first,
    in row order, and the blank padding images after them, so every row's slots still meet its own images."""
    k = len(batches)
    f = max(d for d in range(1, max(1, min(most, k)) + 1) if k % d == 0)
    if f == 1:
        return batches
    joined = []
    for group in (batches[i:i + f] for i in range(0, k, f)):
        out = {key: np.concatenate([b[key] for b in group]) for key in group[0] if key != "pixel_values"}
        pixels = group[0]["pixel_values"]
        real = [b["pixel_values"][:int(b["num_images"].sum())] for b in group]
        padding = np.zeros((f * len(pixels) - sum(len(r) for r in real), *pixels.shape[1:]), pixels.dtype)
        out["pixel_values"] = np.concatenate([*real, padding])
        joined.append(out)
    return joined


def _copy(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: ({d: (dict(v) if isinstance(v, dict) else v) for d, v in val.items()} if isinstance(val, dict) else val)
            for k, val in counts.items()}

