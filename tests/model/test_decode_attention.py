import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.model.attention import naive_attention
from ghostvis_jax.model.decode_attention import (decode_attention, decode_step_attention, num_splits, step_supported,
                                                 supported)
from ghostvis_jax.model.rope import apply_rope, rope_cos_sin

# Per row: full cache, left padding with an end off the block grid, a single valid position, block-aligned range.
STARTS = np.array([0, 5, 20, 16], np.int32)
ENDS = np.array([64, 50, 21, 48], np.int32)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(dtype, num_heads, num_kv, seq_len=64, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)  # numpy draws: no tiny jax programs to compile per shape
    batch = len(STARTS)
    q = jnp.asarray(rng.normal(size=(batch, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, seq_len, num_kv, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, seq_len, num_kv, head_dim)), dtype)
    return q, k, v


def _reference(q, k, v, start, end):
    positions = jnp.arange(k.shape[1])
    mask = (positions >= start[:, None]) & (positions < end[:, None])
    return naive_attention(q[:, None], k, v, causal=False, mask=mask[:, None, None, :])[:, 0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv", [(4, 2), (4, 4), (12, 2)], ids=["gqa", "mha", "gqa_group6"])
@pytest.mark.parametrize("block_k", [16, None])
def test_matches_naive_attention(dtype, num_heads, num_kv, block_k):
    q, k, v = _inputs(dtype, num_heads, num_kv)
    start, end = jnp.asarray(STARTS), jnp.asarray(ENDS)
    out = decode_attention(q, k, v, start, end, block_k=block_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(q, k, v, start, end), np.float32),
                               atol=tol, rtol=tol)


def test_single_position_row_returns_that_value():
    q, k, v = _inputs(jnp.float32, 4, 2)
    out = decode_attention(q, k, v, jnp.asarray(STARTS), jnp.asarray(ENDS), block_k=16)
    np.testing.assert_allclose(out[2], jnp.repeat(v[2, 20], 2, axis=0), atol=1e-6)


def test_custom_scale_under_jit():
    q, k, v = _inputs(jnp.float32, 4, 2)
    start, end = jnp.asarray(STARTS), jnp.asarray(ENDS)
    out = jax.jit(lambda *a: decode_attention(*a, scale=0.3, block_k=32))(q, k, v, start, end)
    positions = jnp.arange(k.shape[1])
    mask = (positions >= start[:, None]) & (positions < end[:, None])
    expected = naive_attention(q[:, None], k, v, causal=False, mask=mask[:, None, None, :], scale=0.3)[:, 0]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_supported():
    assert supported((1, 12, 128), (1, 1024, 2, 128), jnp.bfloat16)
    assert not supported((1, 4, 72), (1, 64, 2, 72), jnp.bfloat16)  # head dim not a power of 2
    assert not supported((1, 4, 512), (1, 64, 2, 512), jnp.bfloat16)  # head dim too large
    assert not supported((1, 4, 16), (1, 40, 2, 16), jnp.bfloat16)  # no block size divides the cache
    assert not supported((1, 4, 16), (1, 64, 3, 16), jnp.bfloat16)  # kv heads do not divide query heads
    assert not supported((1, 4, 16), (1, 64, 2, 16), jnp.int8)
    with pytest.raises(ValueError):
        q, k, v = _inputs(jnp.float32, 4, 2, head_dim=24)
        decode_attention(q, k, v, jnp.asarray(STARTS), jnp.asarray(ENDS))


def _step_inputs(dtype, num_kv, group, seq_len=64, head_dim=32, seed=1):
    rng = np.random.default_rng(seed)
    batch = len(STARTS)
    qkv = jnp.asarray(rng.normal(size=(batch, num_kv, group + 2, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 500, size=(batch, 1)))
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
    k = jnp.asarray(rng.normal(size=(batch, seq_len, num_kv, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, seq_len, num_kv, head_dim)), dtype)
    return qkv, cos, sin, k, v


def _step_reference(qkv, cos, sin, k_cache, v_cache, start, index):
    """What Qwen2Attention does without the fused kernel: RoPE on [q|k], two cache writes, attention."""
    batch, num_kv, parts, head_dim = qkv.shape
    group = parts - 2
    qk = apply_rope(qkv[:, None, :, :group + 1], cos[:, None], sin[:, None])[:, 0]
    q = qk[:, :, :group].reshape(batch, num_kv * group, head_dim)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, qk[:, None, :, group], index, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, qkv[:, None, :, group + 1], index, axis=1)
    clamped = min(index, k_cache.shape[1] - 1)
    return _reference(q, k_cache, v_cache, start, jnp.full_like(start, clamped + 1)), k_cache, v_cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_kv,group", [(2, 6), (4, 1), (1, 2)], ids=["group6", "mha", "group2"])
@pytest.mark.parametrize("index", [20, 48, 63, 70], ids=["mid_block", "block_start", "last", "past_end"])
def test_decode_step_matches_rope_cache_write_and_attention(dtype, num_kv, group, index, splits=None):
    # splits=None: num_splits picks 4 for these shapes (one per cache block of 16), so a row whose keys span
    # fewer blocks also has splits with nothing to read.
    qkv, cos, sin, k, v = _step_inputs(dtype, num_kv, group)
    start = jnp.asarray(np.minimum(STARTS, 20))  # every row has keys before index (20 is the first one tested)
    want, want_k, want_v = _step_reference(qkv, cos[:, 0], sin[:, 0], k, v, start, index)
    got, got_k, got_v = jax.jit(decode_step_attention, static_argnames=("block_k", "splits"))(
        qkv, cos[:, 0], sin[:, 0], k, v, start, index, block_k=16, splits=splits)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    # The cache: the new key and value land at `index` (rounded as the unfused path rounds); nothing else moves.
    np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32),
                               atol=TOLERANCE[dtype] / 4, rtol=0)
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    untouched = np.arange(k.shape[1]) != min(index, k.shape[1] - 1)
    np.testing.assert_array_equal(np.asarray(got_k)[:, untouched], np.asarray(k)[:, untouched])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("index", [20, 63], ids=["mid_block", "last"])
def test_decode_step_with_other_split_counts(splits, index):
    # One program per (row, kv head); and 3 splits of a row's 2-4 blocks (shares of 1 or 2 blocks, some empty).
    test_decode_step_matches_rope_cache_write_and_attention(jnp.bfloat16, 2, 6, index, splits=splits)


def test_split_count_aims_at_the_program_target_with_at_most_one_split_per_block():
    # Qwen2.5-1.5B (2 kv heads) in the generate bench: a 384-position cache in blocks of 64.
    assert num_splits(batch=8, num_kv=2, seq_len=384, block_k=64) == 6     # capped: 6 cache blocks
    assert num_splits(batch=8, num_kv=2, seq_len=1024, block_k=64) == 8    # 128 programs
    assert num_splits(batch=64, num_kv=2, seq_len=384, block_k=64) == 1    # 128 programs already
    assert num_splits(batch=512, num_kv=4, seq_len=512, block_k=64) == 1
    qkv, cos, sin, k, v = _step_inputs(jnp.float32, 2, 2)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        decode_step_attention(qkv, cos[:, 0], sin[:, 0], k, v, jnp.zeros((len(STARTS),), jnp.int32), 3, splits=0)


def test_decode_step_with_only_the_new_token_returns_its_value():
    qkv, cos, sin, k, v = _step_inputs(jnp.float32, 2, 2)
    out, _, _ = decode_step_attention(qkv, cos[:, 0], sin[:, 0], k, v, jnp.full((len(STARTS),), 30), 30)
    np.testing.assert_allclose(out, jnp.repeat(qkv[:, :, 3], 2, axis=1), atol=1e-6)


def test_decode_step_rejects_bad_shapes():
    qkv, cos, sin, k, v = _step_inputs(jnp.float32, 2, 2)
    with pytest.raises(ValueError, match="cos/sin"):
        decode_step_attention(qkv, cos, sin, k, v, jnp.zeros((len(STARTS),), jnp.int32), 3)
    with pytest.raises(ValueError, match=r"decode_step_attention: qkv \(4, 2, 4, 32\) float32, k .* bfloat16"):
        decode_step_attention(qkv, cos[:, 0], sin[:, 0], k.astype(jnp.bfloat16), v, jnp.zeros(4, jnp.int32), 3)
    assert step_supported((1, 2, 8, 128), (1, 1024, 2, 128), jnp.bfloat16)
    assert not step_supported((1, 2, 8, 16), (1, 64, 2, 16), jnp.bfloat16)  # half a head is below Triton's 16
    assert not step_supported((1, 2, 2, 32), (1, 64, 2, 32), jnp.bfloat16)  # no query head
