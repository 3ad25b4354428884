"""An LRU cache of image embeddings keyed by image content, so a repeated image skips the vision tower."""

from __future__ import annotations

import collections
import hashlib

import jax
from PIL import Image


def image_key(image: Image.Image) -> str:
    """A digest of the decoded pixels (mode, size, bytes): equal images share a key whatever their source."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ImageEmbeddingCache:
    """`capacity` embeddings [N, D] (device arrays); `hits` / `misses` count lookups since the last clear."""

    def __init__(self, capacity: int = 256):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, jax.Array] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> jax.Array | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: jax.Array) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self), "capacity": self.capacity}

    def __repr__(self) -> str:
        return f"ImageEmbeddingCache({self.info()})"
