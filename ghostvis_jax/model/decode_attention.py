"""Fused single-token decode attention over a KV cache, as one Pallas (Triton) kernel.

Why: during autoregressive decode XLA runs about five small kernels per layer for attention (scores dot, mask,
softmax reductions, value dot); at 1.5B params the per-kernel cost dominates a decode step. This kernel does all
of it in one launch: one program per (batch row, kv head) loads that kv head's group of query heads, streams the
cache blocks that intersect the row's valid range [start, end) with an online softmax in float32, and writes the
normalised result.

Layout matches `attention.py`: q [B, N, H], cache [B, S, K, H] read in place (no transpose of the cache, which
would copy it every step); query head n uses kv head n // (N // K), as HF's repeat_kv.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MIN_BLOCK = 16  # Triton's dot needs every dim >= 16
# Tuning knobs (tools/benchmark.py --decode-block-k sets both): the largest cache block, and the most bytes one
# [block_k, H] cache tile may take (keeps the per-program working set modest).
MAX_BLOCK_K = 128
BLOCK_BYTES = 16 * 1024


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _default_block_k(seq_len: int, head_dim: int, dtype) -> int | None:
    """Largest power-of-2 block (16..MAX_BLOCK_K, tile <= BLOCK_BYTES) dividing the cache length; None if none
    does."""
    block_k = MAX_BLOCK_K
    while block_k > _MIN_BLOCK and (block_k * head_dim * jnp.dtype(dtype).itemsize > BLOCK_BYTES
                                    or seq_len % block_k):
        block_k //= 2
    return block_k if seq_len % block_k == 0 else None


def supported(q_shape, cache_shape, dtype) -> bool:
    """Whether `decode_attention` handles this case; otherwise the caller should use XLA attention.

    Triton needs power-of-2 tensor sizes, so head_dim must be a power of 2 in [16, 256]; the cache length must be
    a multiple of 16 so that some block size divides it; the kernel's element offsets are int32.
    """
    if len(q_shape) != 3 or len(cache_shape) != 4:
        return False
    batch, num_heads, head_dim = q_shape
    cache_batch, seq_len, num_kv, cache_head_dim = cache_shape
    return (batch == cache_batch and head_dim == cache_head_dim and num_heads % num_kv == 0
            and _is_power_of_2(head_dim) and _MIN_BLOCK <= head_dim <= 256
            and jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES)
            and _default_block_k(seq_len, head_dim, dtype) is not None and math.prod(cache_shape) < 2**31)


def _decode_kernel(q_ref, k_ref, v_ref, start_ref, end_ref, out_ref, *, scale, block_k, group_size):
    """q_ref/out_ref [G_pad, H] (rows >= group_size belong to no head of this group), k_ref/v_ref [S, H]."""
    group_pad, head_dim = q_ref.shape
    start, end = start_ref[()], end_ref[()]
    row_is_head = (jnp.arange(group_pad) < group_size)[:, None]
    q = plgpu.load(q_ref, mask=row_is_head, other=0)

    # Pallas Triton lowers a float32 dot at default precision to TF32; ask for full float32 (IEEE) instead.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=jnp.float32)

    def body(block, carry):
        acc, running_max, running_sum = carry
        first = pl.multiple_of(block * block_k, block_k)
        k = k_ref[pl.ds(first, block_k), :]
        v = v_ref[pl.ds(first, block_k), :]
        scores = dot(q, k, (((1,), (1,)), ((), ()))) * scale
        positions = first + jnp.arange(block_k)
        # Every visited block holds at least one valid position, so each row's max is finite and -inf is safe.
        scores = jnp.where(((positions >= start) & (positions < end))[None, :], scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[:, None])
        acc = acc * rescale[:, None] + dot(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())))
        return acc, new_max, running_sum * rescale + probs.sum(axis=1)

    init = (jnp.zeros((group_pad, head_dim), jnp.float32), jnp.full((group_pad,), -jnp.inf, jnp.float32),
            jnp.zeros((group_pad,), jnp.float32))
    # Only the blocks that intersect [start, end): a short row in a long cache reads just what it needs.
    acc, _, total = lax.fori_loop(start // block_k, pl.cdiv(end, block_k), body, init)
    plgpu.store(out_ref, (acc / total[:, None]).astype(out_ref.dtype), mask=row_is_head)


def decode_attention(q, k_cache, v_cache, start, end, *, scale=None, block_k=None, interpret=None) -> jax.Array:
    """q [B, N, H] (one new token per row), k_cache/v_cache [B, S, K, H] (K divides N; grouped-query: q head n
    uses kv head n // (N // K), as HF repeat_kv), start/end int32 [B]: row b attends to cache positions
    start[b] <= s < end[b] (contiguous; end > start guaranteed by the caller). Returns [B, N, H] in q.dtype.
    Softmax in float32. interpret=None means: interpret mode when jax.default_backend() != 'gpu'."""
    batch, num_heads, head_dim = q.shape
    _, seq_len, num_kv, _ = k_cache.shape
    if not supported(q.shape, k_cache.shape, q.dtype) or k_cache.shape != v_cache.shape \
            or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"decode_attention does not support q {q.shape} {q.dtype}, "
                         f"k {k_cache.shape} {k_cache.dtype}, v {v_cache.shape} {v_cache.dtype}")
    block_k = block_k or _default_block_k(seq_len, head_dim, q.dtype)
    if not (_is_power_of_2(block_k) and block_k >= _MIN_BLOCK and seq_len % block_k == 0):
        raise ValueError(f"block_k={block_k} must be a power of 2 >= {_MIN_BLOCK} dividing cache length {seq_len}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    group_size = num_heads // num_kv
    # The group's block is padded to a power of 2 >= 16 for Triton; the padded rows are masked on load and store.
    group_pad = max(_MIN_BLOCK, pl.next_power_of_2(group_size))
    kernel = functools.partial(_decode_kernel, scale=head_dim ** -0.5 if scale is None else scale,
                               block_k=block_k, group_size=group_size)
    head_group_spec = pl.BlockSpec((None, None, group_pad, head_dim), lambda b, j: (b, j, 0, 0))
    cache_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, j: (b, 0, j, 0))
    row_scalar_spec = pl.BlockSpec((None,), lambda b, j: (b,))
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv),
        in_specs=[head_group_spec, cache_spec, cache_spec, row_scalar_spec, row_scalar_spec],
        out_specs=head_group_spec,
        out_shape=jax.ShapeDtypeStruct((batch, num_kv, group_size, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(q.reshape(batch, num_kv, group_size, head_dim), k_cache, v_cache,
      start.astype(jnp.int32), end.astype(jnp.int32))
    return out.reshape(batch, num_heads, head_dim)
