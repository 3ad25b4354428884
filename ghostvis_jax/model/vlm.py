"""GhostVis: SigLIP tower → resampler → projector → image embeddings scattered into the decoder's image slots.

The token sequence already holds N image-slot tokens (`config.image_token_id`) per image; the k-th slot of the
batch (row-major) receives the k-th image's embeddings, so positions and targets stay aligned with the text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghostvis_jax.config import GhostVisConfig
from ghostvis_jax.model.projector import MLPProjector
from ghostvis_jax.model.qwen2 import KVCache, Qwen2Decoder
from ghostvis_jax.model.resampler import AvgPoolResampler, PerceiverResampler
from ghostvis_jax.model.siglip import SiglipVisionTower


def scatter_image_embeds(text_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Put image_embeds [I, N, D] into the slots of text_embeds [B, T, D] where input_ids == image_token_id.

    Slots are filled in row-major order; images beyond the number of slots (blank padding) are unused.
    """
    b, t, d = text_embeds.shape
    is_slot = input_ids == image_token_id
    flat_images = image_embeds.reshape(-1, d).astype(text_embeds.dtype)
    # A slot's rank = the slots in earlier rows + those before it in its row. Not one cumsum over the flattened
    # batch: with rows sharded over devices, XLA's GPU backend ran that scan as ~33k kernels a step (2 H100s,
    # docs/LOG.md); a per-row cumsum stays on one device and the row offsets are a [B, B] masked sum.
    per_row = jnp.sum(is_slot, axis=1, dtype=jnp.int32)
    earlier_rows = jnp.arange(b)[None, :] < jnp.arange(b)[:, None]
    row_offset = jnp.sum(jnp.where(earlier_rows, per_row[None, :], 0), axis=1)
    slot_rank = row_offset[:, None] + jnp.cumsum(is_slot, axis=1, dtype=jnp.int32) - 1
    slot_rank = jnp.clip(slot_rank, 0, flat_images.shape[0] - 1)
    return jnp.where(is_slot[..., None], flat_images[slot_rank], text_embeds)


def check_image_slots(input_ids, num_images: int, num_image_tokens: int, image_token_id: int) -> None:
    """Eager check (outside jit) that the sequence has exactly N slots per image given."""
    slots = int(np.sum(np.asarray(input_ids) == image_token_id))
    if slots != num_images * num_image_tokens:
        raise ValueError(
            f"the token sequence has {slots} image slots (token id {image_token_id}) but {num_images} image(s) "
            f"x {num_image_tokens} tokens = {num_images * num_image_tokens} were given")


class GhostVisModel(nnx.Module):
    def __init__(self, config: GhostVisConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = config
        v, llm = config.vision, config.llm
        self.vision = SiglipVisionTower(v, rngs=rngs, **kw)
        if config.resampler.mode == "perceiver":
            self.resampler = PerceiverResampler(v.hidden_size, config.resampler, rngs=rngs, **kw)
        else:
            self.resampler = AvgPoolResampler(v.num_patches, config.resampler, dtype=dtype)
        self.projector = MLPProjector(v.hidden_size, llm.hidden_size, config.projector, rngs=rngs, **kw)
        self.llm = Qwen2Decoder(llm, rngs=rngs, **kw)

    def vision_features(self, pixel_values: jax.Array) -> jax.Array:
        """[I, H, W, 3] normalized pixels → [I, P, D_v] patch tokens."""
        return self.vision(pixel_values)

    def encode_images(self, pixel_values: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """[I, H, W, 3] → [I, N, D_llm]. The tower is frozen: no gradient flows into it."""
        feats = jax.lax.stop_gradient(self.vision(pixel_values))
        return self.projector(self.resampler(feats), dropout_rngs)

    def embed_inputs(self, input_ids: jax.Array, image_embeds: jax.Array | None = None) -> jax.Array:
        x = self.llm.embed(input_ids)
        if image_embeds is None:
            return x
        return scatter_image_embeds(x, input_ids, image_embeds, self.config.image_token_id)

    def hidden_states(self, input_ids, pixel_values=None, *, image_embeds=None, positions=None, mask=None,
                      cache: KVCache | None = None, cache_index=None, dropout_rngs=None):
        """Final-normed decoder states [B, T, D] (and the updated KV cache when one is given)."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, dropout_rngs)
        x = self.embed_inputs(input_ids, image_embeds)
        return self.llm(x, positions, mask, cache, cache_index)

    def __call__(self, input_ids, pixel_values=None, *, image_embeds=None, positions=None, mask=None):
        """input_ids [B, T] (+ pixels [I, H, W, 3] for the I images whose slots are in it) → logits [B, T, V]."""
        hidden, _ = self.hidden_states(input_ids, pixel_values, image_embeds=image_embeds, positions=positions,
                                       mask=mask)
        return self.llm.logits(hidden)
