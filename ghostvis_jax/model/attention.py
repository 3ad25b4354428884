"""The one attention entry point: cuDNN flash attention on GPU where the shape allows, a Pallas kernel for
single-token decode steps, XLA otherwise.

Layout everywhere: q [B, T, N, H], k/v [B, S, K, H] with K dividing N (grouped-query attention).
`mask` is boolean, True = may attend, broadcastable to [B, N, T, S] — or a `KeyRange` (each row attends to one
contiguous span of keys: a decode step over a left-padded KV cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("cudnn", "xla", "naive", "pallas")
PALLAS_DECODE_MIN_PROGRAMS = 16  # batch x kv heads of a decode step before the Pallas kernel is picked


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KeyRange:
    """Row b attends to the keys at positions start[b] <= s < end[b] (int32 [B] each; end > start)."""
    start: jax.Array
    end: jax.Array

    def as_mask(self, num_keys: int) -> jax.Array:
        s = jnp.arange(num_keys)
        return ((s >= self.start[:, None]) & (s < self.end[:, None]))[:, None, None, :]


def pick_implementation(q: jax.Array, k: jax.Array, mask) -> str:
    """cuDNN's fused kernel needs a GPU, half precision, a head dim it supports and no explicit mask; a decode
    step (one query, a KeyRange) takes the Pallas kernel when it supports the shape (single device)."""
    if jax.default_backend() != "gpu":
        return "xla"
    if isinstance(mask, KeyRange):
        from ghostvis_jax.model import decode_attention  # Pallas is imported only where a decode step may use it

        # At least one kernel program per (row, kv head) (decode_step_attention splits a row's cache blocks
        # further when there are few rows). With RoPE and the cache write inside it beats XLA's attention from 16
        # programs on an H100: 2-3% at batch 8, 6-7% at batch 64; at batch 1 (2 programs) the two were within
        # noise (docs/LOG.md).
        decode_ok = (q.shape[1] == 1 and q.shape[0] * k.shape[2] >= PALLAS_DECODE_MIN_PROGRAMS
                     and jax.sharding.get_abstract_mesh().empty and k.dtype == q.dtype
                     and decode_attention.supported((q.shape[0],) + q.shape[2:], k.shape, q.dtype))
        return "pallas" if decode_ok else "xla"
    head_dim = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or head_dim % 8 or head_dim > 128:
        return "xla"
    if mask is not None or q.shape[1] == 1:
        return "xla"
    return "cudnn"


def naive_attention(q, k, v, *, causal: bool, mask=None, scale: float | None = None) -> jax.Array:
    """Reference: repeat kv heads, softmax in float32. Used by tests and as the readable definition."""
    num_heads, num_kv = q.shape[2], k.shape[2]
    k = jnp.repeat(k, num_heads // num_kv, axis=2)
    v = jnp.repeat(v, num_heads // num_kv, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    allowed = jnp.ones(logits.shape, bool)
    if causal:
        t, s = q.shape[1], k.shape[1]
        allowed = allowed & (jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :])
    if mask is not None:
        allowed = allowed & mask
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v.astype(jnp.float32)).astype(q.dtype)


def _same_batch_sharding(*xs):
    """Under a mesh context, lay q, k and v out alike (batch over data x fsdp): cuDNN's partitioner requires
    identical shardings, which GSPMD does not guarantee for differently-sized q and kv projections."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return xs
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    spec = jax.sharding.PartitionSpec(batch_axes if batch_axes else None)
    return tuple(jax.lax.with_sharding_constraint(x, spec) for x in xs)


def attention(q, k, v, *, causal: bool, mask=None, scale: float | None = None,
              implementation: str | None = None) -> jax.Array:
    impl = implementation or pick_implementation(q, k, mask)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "pallas":
        if not isinstance(mask, KeyRange) or q.shape[1] != 1 or causal:
            raise ValueError("the Pallas attention kernel serves single-token decode steps with a KeyRange mask")
        from ghostvis_jax.model.decode_attention import decode_attention

        return decode_attention(q[:, 0], k, v, mask.start, mask.end, scale=scale)[:, None]
    if isinstance(mask, KeyRange):
        mask = mask.as_mask(k.shape[1])
    if impl == "cudnn":
        q, k, v = _same_batch_sharding(q, k, v)
    if impl == "naive":
        return naive_attention(q, k, v, causal=causal, mask=mask, scale=scale)
    if causal and mask is not None:
        t, s = q.shape[1], k.shape[1]
        mask = mask & (jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :])
        causal = False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation=impl)
