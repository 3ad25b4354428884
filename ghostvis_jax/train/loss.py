"""Cross-entropy over the loss tokens, computed in sequence chunks so the [tokens, vocab] float32 logits of the
whole batch never exist at once (each chunk's logits are recomputed in the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(logits_fn, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                          chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Sum of per-token NLL over loss_mask, and the number of loss tokens.

    hidden [B, T, D], targets int [B, T], loss_mask [B, T]; logits_fn maps [B, c, D] → [B, c, V].
    Returning the sum (not the mean) lets gradient accumulation normalize by the global token count.
    """
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, chunk).swapaxes(0, 1).astype(jnp.float32)

    @jax.checkpoint
    def chunk_nll(h, tgt, m):
        logits = logits_fn(h).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * m)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, jnp.sum(loss_mask.astype(jnp.float32))
