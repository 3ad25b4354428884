import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.model.attention import naive_attention
from ghostvis_jax.model.decode_attention import decode_attention, supported

# Per row: full cache, left padding with an end off the block grid, a single valid position, block-aligned range.
STARTS = np.array([0, 5, 20, 16], np.int32)
ENDS = np.array([64, 50, 21, 48], np.int32)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(dtype, num_heads, num_kv, seq_len=64, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    batch = len(STARTS)
    q = jax.random.normal(keys[0], (batch, num_heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, seq_len, num_kv, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq_len, num_kv, head_dim)).astype(dtype)
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
