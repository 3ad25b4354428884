"""Cross-entropy over the loss tokens with a hand-written backward pass, in chunks that skip tokens without a loss.

The LM head is the biggest single matmul of a step ([tokens, d] x [d, 151,936]). Autodiff through
`logsumexp(h @ W)` either keeps float32 logits (2x the memory of the compute-dtype ones) or, under
`jax.checkpoint`, recomputes the head matmul in the backward pass. Here the forward keeps the logits in the
compute dtype they were produced in (the numbers are the same ones autodiff would see) plus one float32
log-normalizer per token; the backward turns them into `softmax - onehot` in one fused pass and runs the gradient
matmuls.

Most positions of a real batch carry no loss: image slots, prompts, the padding up to the step's length. So the
tokens of each batch shard (the rows one device holds) are put in one stream, loss tokens first, and cut into
chunks of `chunk_tokens`; a chunk past every shard's last loss token is skipped, forward and backward (a
`lax.cond`: its saved logits are zero-filled, nothing else runs; a stream of one chunk runs as it is). Caption rows
of ~30 loss tokens in a 256-token step run the head over a fraction of the step. Chunking also bounds the float32
temporaries of one chunk; the saved logits of all chunks together take tokens x vocab x 2 bytes (5 GB for 8 x 2048
tokens at the Qwen vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ghostvis_jax.sharding import batch_shards, constrain_batch, map_rows
from ghostvis_jax.train.logsumexp import row_logsumexp


@jax.custom_vjp
def _chunk_nll(h, w, targets, mask, active):
    """h [S, c, D] (compute dtype), w [V, D] (any float dtype), active: bool scalar, or None (no skipping) → sum
    over the chunk of mask * NLL (float32); 0 without running anything where not active."""
    return _chunk_fwd(h, w, targets, mask, active)[0]


def _chunk_fwd(h, w, targets, mask, active):
    def run():
        logits = jnp.einsum("scd,vd->scv", h, w.astype(h.dtype))
        logz = row_logsumexp(logits)  # one read of the logits on a GPU (train/logsumexp.py)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
        return jnp.sum((logz - picked) * mask), logits, logz

    def skip():
        return (jnp.zeros((), jnp.float32), jnp.zeros(h.shape[:-1] + w.shape[:1], h.dtype),
                jnp.zeros(h.shape[:-1], jnp.float32))

    total, logits, logz = run() if active is None else jax.lax.cond(active, run, skip)
    return total, (h, w, targets, mask, active, logits, logz)


def _chunk_bwd(res, g):
    (h, w, targets, mask, active, logits, logz), w_trained = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the loss is not used: nothing flows back
        return None, None, None, None, None

    def run():
        probs = jnp.exp(logits.astype(jnp.float32) - logz[..., None])
        onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
        dlogits = ((probs - onehot) * (g * mask)[..., None]).astype(h.dtype)
        dh = jnp.einsum("scv,vd->scd", dlogits, w.astype(h.dtype))
        if w_trained is None:  # a frozen head (sft, align): its gradient matmul never runs
            return dh, None
        return dh, jnp.einsum("scv,scd->vd", dlogits, h, preferred_element_type=jnp.float32).astype(w.dtype)

    def skip():
        return jnp.zeros_like(h), (None if w_trained is None else jnp.zeros_like(w))

    dh, dw = run() if active is None else jax.lax.cond(active, run, skip)
    return dh, dw, None, None, None


def _fwd_marking_head(h, w, targets, mask, active):
    """With symbolic zeros: `w.perturbed` says whether the head is trained; the residuals mark it by an empty
    array (trained) or None (frozen: the backward skips the weight-gradient matmul)."""
    total, res = _chunk_fwd(*(a.value for a in (h, w, targets, mask)), None if active is None else active.value)
    return total, (res, jnp.zeros((0,)) if w.perturbed else None)


_chunk_nll.defvjp(_fwd_marking_head, _chunk_bwd, symbolic_zeros=True)


def _take_positions(x, order):
    """x [S, L, ...] → x[s, order[s]] for order [S, L], on each device's own rows."""
    return map_rows(lambda a, o: jnp.take_along_axis(a, o.reshape(o.shape + (1,) * (a.ndim - 2)), axis=1), x, order)


@jax.custom_vjp
def _gather_positions(x, order, inverse):
    """x [S, L, D] → x[s, order[s]]; its gradient gathers back by the inverse permutation (no scatter)."""
    return _take_positions(x, order)


def _gather_fwd(x, order, inverse):
    return _gather_positions(x, order, inverse), inverse


def _gather_bwd(inverse, g):
    return _take_positions(g, inverse), None, None


_gather_positions.defvjp(_gather_fwd, _gather_bwd)


def _loss_first(mask):
    """mask [S, L] → (order, inverse): a stable permutation of each shard's positions with its loss tokens first."""
    order = jnp.argsort(mask <= 0, axis=1, stable=True).astype(jnp.int32)
    return order, jnp.argsort(order, axis=1).astype(jnp.int32)


def chunked_cross_entropy(head_weight: jax.Array, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                          chunk_tokens: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Sum of per-token NLL over loss_mask, and the number of loss tokens.

    head_weight [V, D] (the tied embedding table, or the LM head kernel transposed); hidden [B, T, D] in the
    compute dtype; targets int [B, T]; loss_mask [B, T]; chunk_tokens: tokens of one batch shard per chunk (the
    granularity of skipping). Returning the sum (not the mean) lets gradient accumulation normalize by the global
    token count.
    """
    b, t, d = hidden.shape
    shards = batch_shards(b)
    length = (b // shards) * t
    # Each shard's rows as one stream: a reshape that keeps every device's rows where they are.
    h = constrain_batch(hidden.reshape(shards, length, d))
    masks, targets = loss_mask.astype(jnp.float32).reshape(shards, length), targets.astype(jnp.int32).reshape(
        shards, length)
    chunk = min(chunk_tokens, length)
    n = -(-length // chunk)
    if n == 1:  # nothing to skip: a batch with no loss token at all is rare enough to run
        return _chunk_nll(h, head_weight, targets, masks, None), jnp.sum(masks)
    order, inverse = map_rows(_loss_first, masks)
    h = _gather_positions(h, order, inverse)
    targets, masks = _take_positions(targets, order), _take_positions(masks, order)
    pad = n * chunk - length
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, masks = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(masks, ((0, 0), (0, pad)))
    most = jnp.max(jnp.sum(masks > 0, axis=1))  # the loss tokens of the shard with the most
    total = jnp.zeros((), jnp.float32)
    for j in range(n):  # unrolled: a scan would stack the saved logits into a zero-filled buffer and copy them
        part = slice(j * chunk, (j + 1) * chunk)
        total = total + _chunk_nll(h[:, part], head_weight, targets[:, part], masks[:, part], most > j * chunk)
    return total, jnp.sum(masks)
