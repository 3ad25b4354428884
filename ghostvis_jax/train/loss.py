"""Cross-entropy over the loss tokens with a hand-written backward pass, in sequence chunks.

The LM head is the biggest single matmul of a step ([tokens, d] x [d, 151,936]). Autodiff through
`logsumexp(h @ W)` either keeps float32 logits (2x the memory of the compute-dtype ones) or, under
`jax.checkpoint`, recomputes the head matmul in the backward pass. Here the forward keeps the logits in the
compute dtype they were produced in (the numbers are the same ones autodiff would see) plus one float32
log-normalizer per token; the backward turns them into `softmax - onehot` in one fused pass and runs the two
gradient matmuls. Chunking bounds the float32 temporaries of one chunk; the saved logits of all chunks
together take tokens x vocab x 2 bytes (5 GB for 8 x 2048 tokens at the Qwen vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ghostvis_jax.train.logsumexp import row_logsumexp


@jax.custom_vjp
def _chunk_nll(h, w, targets, mask):
    """h [B, c, D] (compute dtype), w [V, D] (any float dtype) → sum over the chunk of mask * NLL (float32)."""
    return _chunk_fwd(h, w, targets, mask)[0]


def _chunk_fwd(h, w, targets, mask):
    logits = jnp.einsum("bcd,vd->bcv", h, w.astype(h.dtype))
    logz = row_logsumexp(logits)  # one read of the logits on a GPU (train/logsumexp.py)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), (h, w, targets, mask, logits, logz)


def _chunk_bwd(res, g):
    h, w, targets, mask, logits, logz = res
    probs = jnp.exp(logits.astype(jnp.float32) - logz[..., None])
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    dlogits = ((probs - onehot) * (g * mask)[..., None]).astype(h.dtype)
    dh = jnp.einsum("bcv,vd->bcd", dlogits, w.astype(h.dtype))
    dw = jnp.einsum("bcv,bcd->vd", dlogits, h, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw, None, None


_chunk_nll.defvjp(_chunk_fwd, _chunk_bwd)


def chunked_cross_entropy(head_weight: jax.Array, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                          chunk_size: int = 2048) -> tuple[jax.Array, jax.Array]:
    """Sum of per-token NLL over loss_mask, and the number of loss tokens.

    head_weight [V, D] (the tied embedding table, or the LM head kernel transposed); hidden [B, T, D] in the
    compute dtype; targets int [B, T]; loss_mask [B, T]; chunk_size: tokens per row in one chunk.
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
    masks, targets = loss_mask.astype(jnp.float32), targets.astype(jnp.int32)
    if n == 1:
        total = _chunk_nll(hidden, head_weight, targets, masks)
    else:
        hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
        ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
        ms = masks.reshape(b, n, chunk).swapaxes(0, 1)

        def body(acc, xs):
            return acc + _chunk_nll(xs[0], head_weight, xs[1], xs[2]), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, jnp.sum(masks)
