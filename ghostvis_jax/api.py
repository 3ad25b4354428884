"""The Python API: `gv.load(DIR)` → a `GhostVis` with forward / vision_features / encode_images / generate."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghostvis_jax import checkpoint
from ghostvis_jax.config import GhostVisConfig
from ghostvis_jax.model.layers import DTYPES
from ghostvis_jax.model.vlm import GhostVisModel, check_image_slots



class GhostVis:
    """A loaded model: config, NNX module, tokenizer (when the checkpoint has one), and jitted entry points."""

    def __init__(self, model: GhostVisModel, config: GhostVisConfig, tokenizer=None, path: str | None = None):
        self.model, self.config, self.tokenizer, self.path = model, config, tokenizer, path
        graphdef, state = nnx.split(model)
        self._graphdef, self._state = graphdef, state
        self._forward = jax.jit(lambda s, ids, px: nnx.merge(graphdef, s)(ids, px))
        self._features = jax.jit(lambda s, px: nnx.merge(graphdef, s).vision_features(px))
        self._encode = jax.jit(lambda s, px: nnx.merge(graphdef, s).encode_images(px))
        from ghostvis_jax.generate.image_cache import ImageEmbeddingCache

        self.image_cache = ImageEmbeddingCache()  # used by generate; `.info()` shows hits / misses

    def forward(self, input_ids, pixel_values=None) -> jax.Array:
        """int [B, T] (+ [num_images, H, W, 3] for the images whose slots the tokens hold) → logits [B, T, V]."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        num_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
        check_image_slots(input_ids, num_images, self.config.num_image_tokens, self.config.image_token_id)
        px = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
        return self._forward(self._state, input_ids, px)

    def vision_features(self, pixel_values) -> jax.Array:
        """[num_images, H, W, 3] normalized → [num_images, P, D_v] patch tokens."""
        return self._features(self._state, jnp.asarray(pixel_values, jnp.float32))

    def encode_images(self, pixel_values) -> jax.Array:
        """[num_images, H, W, 3] normalized → [num_images, N, D_llm] image embeddings."""
        return self._encode(self._state, jnp.asarray(pixel_values, jnp.float32))

    def preprocess_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images / paths / bytes → [num_images, H, W, 3] with the tower's own resize and mean/std."""
        from ghostvis_jax.data.images import preprocess_image

        return np.stack([preprocess_image(img, self.config.vision) for img in images]).astype(np.float32)

    def generate(self, prompts, images=None, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, **kwargs):
        """Replies to prompts with a KV cache: a list of str (of `Generation`s with `return_tokens=True`).

        prompts: a str, a message list, a {"messages", "images"} dict, or a list of those.
        images: per prompt an image (PIL / path / bytes), a list of them, or None; `<image>` in the text marks
        where each goes (missing placeholders go at the start of the first user turn).
        Greedy when temperature is 0; top_k 0 = no limit; sampling is deterministic for a seed.
        Keyword-only: stop (tokens or ids; default <|im_end|>, <|endoftext|>), system_prompt, return_tokens,
        stream (a callable (row, text_delta) called as tokens are produced).
        """
        from ghostvis_jax.generate import generate

        return generate(self, prompts, images, max_new_tokens, temperature, top_k, top_p, seed, **kwargs)


def load(path: str, *, dtype: str = "float32") -> GhostVis:
    """Load a converted or trained checkpoint folder. `dtype` is the compute and storage dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config, model = checkpoint.load_model(path, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    tokenizer = None
    tok_dir = checkpoint.tokenizer_path(path)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return GhostVis(model, config, tokenizer, path)
