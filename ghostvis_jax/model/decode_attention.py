"""Fused single-token decode attention over a KV cache, as one Pallas (Triton) kernel.

Why: during autoregressive decode XLA runs about five small kernels per layer for attention (scores dot, mask,
softmax reductions, value dot); at 1.5B params the per-kernel cost dominates a decode step. This kernel does all
of it in one launch: one program per (batch row, kv head) loads that kv head's group of query heads, streams the
cache blocks that intersect the row's valid range [start, end) with an online softmax in float32, and writes the
normalised result. The decode step's kernel (`decode_step_attention`, with RoPE and the cache write inside) also
splits each row's blocks over several programs when there are few rows, their partial softmaxes combined
afterwards: one program per (row, kv head) left most of an H100's SMs idle at batch 1 (16 programs).

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

from ghostvis_jax.model.rope import rope_halves

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MIN_BLOCK = 16  # Triton's dot needs every dim >= 16
# Tuning knobs (tools/benchmark.py --decode-block-k sets both): the largest cache block, and the most bytes one
# [block_k, H] cache tile may take (keeps the per-program working set modest).
MAX_BLOCK_K = 128
BLOCK_BYTES = 16 * 1024
NUM_WARPS = 4   # Triton launch shape of both kernels (tools/benchmark.py --decode-warps / --decode-stages)
# Cache blocks in flight. At batch 64 (one program per SM) the decode step's kernel took 9.7 µs with 3 against
# 10.9 with 2 and 10.2 with 4 (H100, docs/LOG.md, eleventh session); at batch 1 (split programs) the same 4.3.
NUM_STAGES = 3
# The decode step splits each row's cache blocks over programs until there are about this many in all (at most
# one split per block): about one wave on an H100's 132 SMs. At batch 1 (8 rows, 16 programs) 6 splits took the
# step from 1.77 to 1.65-1.69 ms; at batch 64 (128 programs) 4 splits cost 0.5-1% (docs/LOG.md, eighth session).
SPLIT_TARGET_PROGRAMS = 128
FORCE_SPLITS = 0  # a fixed split count instead (tools/benchmark.py --decode-splits; 0: `num_splits` picks)


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


def _attend_cache(q_parts, k_ref, v_ref, lo, hi, init, *, scale, block_k, blocks=None):
    """Online softmax of the queries over cache positions lo <= s < hi, continuing from `init` = (acc, max, sum).

    q_parts: ((q [G_pad, h], first column), ...) — the query split along the head dim (the RoPE kernel keeps its
    two halves apart); each part is dotted with the same columns of the key tiles. blocks: (first, end) cache
    blocks to visit, a sub-range of those that intersect [lo, hi) (default: all of them)."""
    # Pallas Triton lowers a float32 dot at default precision to TF32; ask for full float32 (IEEE) instead.
    precision = lax.Precision.HIGHEST if q_parts[0][0].dtype == jnp.float32 else None
    dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=jnp.float32)

    def body(block, carry):
        acc, running_max, running_sum = carry
        first = pl.multiple_of(block * block_k, block_k)
        scores = sum(dot(q, k_ref[pl.ds(first, block_k), pl.ds(col, q.shape[1])], (((1,), (1,)), ((), ())))
                     for q, col in q_parts) * scale
        positions = first + jnp.arange(block_k)
        # Every visited block holds at least one valid position, so each row's max is finite and -inf is safe.
        scores = jnp.where(((positions >= lo) & (positions < hi))[None, :], scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[:, None])
        v = v_ref[pl.ds(first, block_k), :]
        acc = acc * rescale[:, None] + dot(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())))
        return acc, new_max, running_sum * rescale + probs.sum(axis=1)

    # Only the blocks that intersect [lo, hi): a short row in a long cache reads just what it needs.
    first, end = (lo // block_k, pl.cdiv(hi, block_k)) if blocks is None else blocks
    return lax.fori_loop(first, end, body, init)


def _decode_kernel(q_ref, k_ref, v_ref, start_ref, end_ref, out_ref, *, scale, block_k, group_size):
    """q_ref/out_ref [G_pad, H] (rows >= group_size belong to no head of this group), k_ref/v_ref [S, H]."""
    group_pad, head_dim = q_ref.shape
    row_is_head = (jnp.arange(group_pad) < group_size)[:, None]
    q = plgpu.load(q_ref, mask=row_is_head, other=0)
    init = (jnp.zeros((group_pad, head_dim), jnp.float32), jnp.full((group_pad,), -jnp.inf, jnp.float32),
            jnp.zeros((group_pad,), jnp.float32))
    acc, _, total = _attend_cache(((q, 0),), k_ref, v_ref, start_ref[()], end_ref[()], init, scale=scale,
                                  block_k=block_k)
    plgpu.store(out_ref, (acc / total[:, None]).astype(out_ref.dtype), mask=row_is_head)


def step_supported(qkv_shape, cache_shape, dtype) -> bool:
    """Whether `decode_step_attention` handles this case: as `supported`, at least one query head per kv head, and
    a head dim of at least 32 (RoPE keeps the two halves of each head apart, and a Triton dot needs 16)."""
    if len(qkv_shape) != 4:
        return False
    batch, num_kv, parts, head_dim = qkv_shape
    return parts >= 3 and head_dim >= 2 * _MIN_BLOCK and supported((batch, num_kv * (parts - 2), head_dim),
                                                                   cache_shape, dtype)


def _block_k_and_interpret(ok: bool, what: str, k_cache, v_cache, dtype, block_k, interpret):
    """Refuse an unsupported call (`ok` False) naming `what`; the cache block size and whether to run in interpret
    mode (off a GPU)."""
    seq_len, head_dim = k_cache.shape[1], k_cache.shape[3]
    if not ok or k_cache.shape != v_cache.shape or not dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"{what} {jnp.dtype(dtype).name}, k {k_cache.shape} {k_cache.dtype}, "
                         f"v {v_cache.shape} {v_cache.dtype}: not supported")
    block_k = block_k or _default_block_k(seq_len, head_dim, dtype)
    if not (_is_power_of_2(block_k) and block_k >= _MIN_BLOCK and seq_len % block_k == 0):
        raise ValueError(f"block_k={block_k} must be a power of 2 >= {_MIN_BLOCK} dividing cache length {seq_len}")
    return block_k, jax.default_backend() != "gpu" if interpret is None else interpret


def _specs(seq_len: int, rows: int, head_dim: int):
    """BlockSpecs over a grid (batch row b, kv head j, ...) — the decode step adds a split axis, which these
    blocks do not depend on: a [rows, H] head-group tile, the [S, H] cache of one kv head, one int32 per row."""
    return (pl.BlockSpec((None, None, rows, head_dim), lambda b, j, *_: (b, j, 0, 0)),
            pl.BlockSpec((None, seq_len, None, head_dim), lambda b, j, *_: (b, 0, j, 0)),
            pl.BlockSpec((None,), lambda b, j, *_: (b,)))


def decode_attention(q, k_cache, v_cache, start, end, *, scale=None, block_k=None, interpret=None) -> jax.Array:
    """q [B, N, H] (one new token per row), k_cache/v_cache [B, S, K, H] (K divides N; grouped-query: q head n
    uses kv head n // (N // K), as HF repeat_kv), start/end int32 [B]: row b attends to cache positions
    start[b] <= s < end[b] (contiguous; end > start guaranteed by the caller). Returns [B, N, H] in q.dtype.
    Softmax in float32. interpret=None means: interpret mode when jax.default_backend() != 'gpu'."""
    batch, num_heads, head_dim = q.shape
    _, seq_len, num_kv, _ = k_cache.shape
    block_k, interpret = _block_k_and_interpret(supported(q.shape, k_cache.shape, q.dtype),
                                                f"decode_attention: q {q.shape}", k_cache, v_cache, q.dtype,
                                                block_k, interpret)
    group_size = num_heads // num_kv
    # The group's block is padded to a power of 2 >= 16 for Triton; the padded rows are masked on load and store.
    group_pad = max(_MIN_BLOCK, pl.next_power_of_2(group_size))
    kernel = functools.partial(_decode_kernel, scale=head_dim ** -0.5 if scale is None else scale,
                               block_k=block_k, group_size=group_size)
    head_group_spec, cache_spec, row_scalar_spec = _specs(seq_len, group_pad, head_dim)
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv),
        in_specs=[head_group_spec, cache_spec, cache_spec, row_scalar_spec, row_scalar_spec],
        out_specs=head_group_spec,
        out_shape=jax.ShapeDtypeStruct((batch, num_kv, group_size, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="decode_attention",
    )(q.reshape(batch, num_kv, group_size, head_dim), k_cache, v_cache,
      start.astype(jnp.int32), end.astype(jnp.int32))
    return out.reshape(batch, num_heads, head_dim)


def _decode_step_kernel(qkv_ref, cos_ref, sin_ref, k_ref, v_ref, start_ref, index_ref, *out_refs, scale, block_k,
                        group_size, splits):
    """qkv_ref [P, H]: rows 0..G-1 this kv head's query heads, row G its new key, row G+1 its new value, before
    RoPE (rows past G+1 are outside the array and never read); cos_ref/sin_ref [H]; k_ref/v_ref [S, H] the cache,
    which k_out_ref/v_out_ref alias. One split (splits == 1): out_ref [P, H] (rows < G written). Several: this
    program's share of the row's cache blocks, as float32 partials acc_ref [P, H], max_ref [P], sum_ref [P]."""
    if splits == 1:
        out_ref, k_out_ref, v_out_ref = out_refs
    else:
        acc_ref, max_ref, sum_ref, k_out_ref, v_out_ref = out_refs
    rows, head_dim = qkv_ref.shape
    half = head_dim // 2
    first, second = pl.ds(0, half), pl.ds(half, half)
    start, index = start_ref[()], index_ref[()]
    dtype = qkv_ref.dtype
    cos1, cos2, sin1, sin2 = cos_ref[first], cos_ref[second], sin_ref[first], sin_ref[second]

    def rope(x1, x2):  # in float32, rounded as apply_rope rounds
        y1, y2 = rope_halves(x1.astype(jnp.float32), x2.astype(jnp.float32), cos1, cos2, sin1, sin2)
        return y1.astype(dtype), y2.astype(dtype)

    row_is_head = (jnp.arange(rows) < group_size)[:, None]
    q1, q2 = rope(plgpu.load(qkv_ref.at[:, first], mask=row_is_head, other=0),
                  plgpu.load(qkv_ref.at[:, second], mask=row_is_head, other=0))
    key_row = pl.ds(group_size, 1)
    k1, k2 = rope(qkv_ref[key_row, first], qkv_ref[key_row, second])   # [1, H/2] each
    v_new = qkv_ref[pl.ds(group_size + 1, 1), :]                        # [1, H]
    split = pl.program_id(2)

    @pl.when(split == 0)  # no split reads position `index`, so the write races with no read
    def _write_cache():
        new_slot = pl.ds(index, 1)
        k_out_ref[new_slot, first] = k1
        k_out_ref[new_slot, second] = k2
        v_out_ref[new_slot, :] = v_new

    # The new token seeds split 0's online softmax; the cache supplies the row's earlier positions start..index-1.
    def f32(x):
        return x.astype(jnp.float32)

    new_score = (jnp.sum(f32(q1) * f32(k1), axis=1) + jnp.sum(f32(q2) * f32(k2), axis=1)) * scale
    seeded = split == 0
    init = (jnp.where(seeded, jnp.broadcast_to(f32(v_new), (rows, head_dim)), 0.0),
            jnp.where(seeded, new_score, -jnp.inf), jnp.where(seeded, 1.0, jnp.zeros((rows,), jnp.float32)))
    first_block, end_block = start // block_k, pl.cdiv(index, block_k)
    share = pl.cdiv(end_block - first_block, splits)
    lo_block = jnp.minimum(first_block + split * share, end_block)
    acc, running_max, total = _attend_cache(((q1, 0), (q2, half)), k_ref, v_ref, start, index, init, scale=scale,
                                            block_k=block_k,
                                            blocks=(lo_block, jnp.minimum(lo_block + share, end_block)))
    if splits == 1:
        plgpu.store(out_ref, (acc / total[:, None]).astype(out_ref.dtype), mask=row_is_head)
    else:  # a split with no blocks leaves (0, -inf, 0): weight 0 in the combination
        acc_ref[...] = acc
        max_ref[...] = running_max
        sum_ref[...] = total


def num_splits(batch: int, num_kv: int, seq_len: int, block_k: int) -> int:
    """Programs per (row, kv head) of the decode step: SPLIT_TARGET_PROGRAMS in all, at most one per cache
    block."""
    return max(1, min(SPLIT_TARGET_PROGRAMS // (batch * num_kv), seq_len // block_k))


def _combine(acc, running_max, total, group_size: int, dtype):
    """The splits' partial softmaxes [B, K, splits, P, ...] → the normalised [B, K, G, H]."""
    weight = jnp.exp(running_max - running_max.max(axis=2, keepdims=True))   # split 0 holds a finite max
    out = (weight[..., None] * acc).sum(axis=2) / (weight * total).sum(axis=2)[..., None]
    return out[:, :, :group_size].astype(dtype)


def decode_step_attention(qkv, cos, sin, k_cache, v_cache, start, index, *, scale=None, block_k=None,
                          splits=None, interpret=None):
    """One decode step's attention with RoPE and the KV-cache write in the same kernel.

    qkv [B, K, G + 2, H]: per kv head its G query heads, then the new key and value, before RoPE (the layout of
    Qwen2Attention's fused projection, bias added); cos/sin [B, H] float32: the new token's rotary tables (HF
    layout); k_cache/v_cache [B, S, K, H] in qkv's dtype; start int32 [B]; index: int scalar, the cache position
    of the new token (clamped into the cache, as dynamic_update_slice would). Row b attends to cache positions
    start[b] <= s < index and to the new token.

    splits: programs per (row, kv head), each taking an equal share of the row's cache blocks (None:
    `num_splits`); their float32 partial softmaxes are combined here (XLA).

    Returns (out [B, K·G, H], k_cache, v_cache): the caches with the rotated key and the value written at
    `index` (in place when the caller donates them); every other position is left as it was."""
    batch, num_kv, parts, head_dim = qkv.shape
    group_size = parts - 2
    seq_len = k_cache.shape[1]
    if cos.shape != sin.shape or cos.shape != (batch, head_dim):
        raise ValueError(f"decode_step_attention: cos/sin must be {(batch, head_dim)} for qkv {qkv.shape}, got "
                         f"{cos.shape} / {sin.shape}")
    block_k, interpret = _block_k_and_interpret(step_supported(qkv.shape, k_cache.shape, qkv.dtype),
                                                f"decode_step_attention: qkv {qkv.shape}", k_cache, v_cache,
                                                qkv.dtype, block_k, interpret)
    if splits is None:
        splits = FORCE_SPLITS or num_splits(batch, num_kv, seq_len, block_k)
    if splits < 1:
        raise ValueError(f"decode_step_attention: splits must be >= 1, got {splits}")
    rows = max(_MIN_BLOCK, pl.next_power_of_2(parts))
    kernel = functools.partial(_decode_step_kernel, scale=head_dim ** -0.5 if scale is None else scale,
                               block_k=block_k, group_size=group_size, splits=splits)
    # The grid (row b, kv head j, split s): `_specs`, and each split's own partial-result blocks.
    head_group_spec, cache_spec, row_scalar_spec = _specs(seq_len, rows, head_dim)
    row_vector_spec = pl.BlockSpec((None, head_dim), lambda b, j, s: (b, 0))
    caches = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    if splits == 1:
        out_specs = [head_group_spec]
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv, group_size, head_dim), qkv.dtype)]
    else:
        out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, j, s: (b, j, s, 0, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, j, s: (b, j, s, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda b, j, s: (b, j, s, 0))]
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv, splits, rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_kv, splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_kv, splits, rows), jnp.float32)]
    index = jnp.broadcast_to(jnp.clip(jnp.asarray(index, jnp.int32), 0, seq_len - 1), (batch,))
    *results, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(batch, num_kv, splits),
        in_specs=[head_group_spec, row_vector_spec, row_vector_spec, cache_spec, cache_spec, row_scalar_spec,
                  row_scalar_spec],
        out_specs=out_specs + [cache_spec, cache_spec],
        out_shape=out_shape + caches,
        input_output_aliases={3: len(out_shape), 4: len(out_shape) + 1},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="decode_step_attention",
    )(qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), k_cache, v_cache, start.astype(jnp.int32), index)
    out = results[0] if splits == 1 else _combine(*results, group_size, qkv.dtype)
    return out.reshape(batch, num_kv * group_size, head_dim), k_cache, v_cache
