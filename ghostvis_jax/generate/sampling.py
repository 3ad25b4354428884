"""Next-token choice: greedy, or temperature sampling restricted by top-k and top-p (nucleus).

All three knobs are traced scalars, so changing them does not recompile. Greedy is a function of its own: the
decode loop compiles a separate greedy program (no sort, no random keys, no branch per token).
Each row draws with its own key, so a row's sample does not depend on its batch neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k, then outside the smallest prefix whose mass reaches top_p.

    logits [B, V] (already divided by the temperature); top_k <= 0 means no top-k limit; the most likely
    token is always kept. Ties at a cut-off are kept.
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
    within_k = jnp.arange(vocab)[None, :] < k
    probs = jax.nn.softmax(jnp.where(within_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = within_k & (mass_before < top_p)
    num_kept = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """logits [B, V] → int32 [B]: the argmax of each row."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sampled_tokens(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One draw per row from the filtered, temperature-scaled distribution (temperature > 0). Logits of any
    dtype are drawn from in float32 (the Gumbel noise takes the logits' dtype)."""
    scaled = filter_logits(logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6), top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
