import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.model.attention import attention, naive_attention, pick_implementation


def _qkv(seed, b=2, t=7, s=7, n=4, k=2, h=16):
    rng = np.random.default_rng(seed)  # numpy draws: no tiny jax programs to compile per shape
    shapes = [(b, t, n, h), (b, s, k, h), (b, s, k, h)]
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)


def _loop_reference(q, k, v, causal, mask=None):
    """Attention written as explicit per-(batch, head, query) loops in numpy: the independent definition."""
    q, k, v = map(np.asarray, (q, k, v))
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            ki = ni // (n // kv)
            for ti in range(t):
                scores = k[bi, :, ki] @ q[bi, ti, ni] / np.sqrt(h)
                allowed = np.ones(s, bool)
                if causal:
                    allowed &= np.arange(s) <= ti + (s - t)
                if mask is not None:
                    allowed &= np.asarray(mask)[bi, 0, ti]
                scores = np.where(allowed, scores, -np.inf)
                p = np.exp(scores - scores.max())
                out[bi, ti, ni] = (p / p.sum()) @ v[bi, :, ki]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["xla", "naive"])
def test_attention_matches_loop_reference(causal, impl):
    q, k, v = _qkv(0)
    got = attention(q, k, v, causal=causal, implementation=impl)
    np.testing.assert_allclose(got, _loop_reference(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_attention_with_padding_mask_and_cache_shape():
    q, k, v = _qkv(1, t=3, s=9)
    mask = np.ones((2, 1, 3, 9), bool)
    mask[0, :, :, :4] = False  # left padding of row 0
    want = _loop_reference(q, k, v, causal=True, mask=mask)
    for impl in ("xla", "naive"):
        got = attention(q, k, v, causal=True, mask=jnp.asarray(mask), implementation=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_implementation_choice_and_unknown_implementation_is_refused():
    from ghostvis_jax.model.attention import KeyRange

    q, k, v = _qkv(2)
    span = KeyRange(jnp.zeros(2, jnp.int32), jnp.full(2, 7, jnp.int32))
    if jax.default_backend() == "gpu":
        assert pick_implementation(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), None) == "cudnn"
        big = jnp.zeros((64, 1, 4, 16), jnp.bfloat16), jnp.zeros((64, 32, 2, 16), jnp.bfloat16)
        assert pick_implementation(*big, KeyRange(jnp.zeros(64, jnp.int32), jnp.ones(64, jnp.int32))) == "pallas"
        assert pick_implementation(q[:, :1].astype(jnp.bfloat16), k.astype(jnp.bfloat16), span) == "xla"  # 4 programs
    else:
        assert pick_implementation(q.astype(jnp.bfloat16), k, None) == "xla"
        assert pick_implementation(q[:, :1], k, span) == "xla"
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, causal=True, implementation="flash9")


def test_naive_equals_xla_under_jit():
    q, k, v = _qkv(3)
    a = jax.jit(lambda *x: naive_attention(*x, causal=True))(q, k, v)
    b = jax.jit(lambda *x: attention(*x, causal=True, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_reference_on_gpu(causal):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(4, b=2, t=128, s=128, n=8, k=2, h=64))
    assert pick_implementation(q, k, None) == "cudnn"
    got = attention(q, k, v, causal=causal, implementation="cudnn").astype(jnp.float32)
    want = naive_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=causal)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 fake CPU devices of the test setup")
def test_cudnn_inputs_get_one_batch_sharding_under_a_mesh():
    """cuDNN's partitioner needs q, k and v laid out alike; under a mesh they are constrained to the batch axes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ghostvis_jax import sharding
    from ghostvis_jax.model.attention import _same_batch_sharding

    mesh = sharding.make_mesh(data=2, fsdp=4)
    q, k, v = _qkv(5, b=8)
    k = jax.device_put(k, NamedSharding(mesh, P(None, None, None, "fsdp")))  # a different layout going in
    with jax.set_mesh(mesh):
        outs = jax.jit(lambda *x: _same_batch_sharding(*x))(q, k, v)
    for x in outs:
        assert x.sharding.spec[0] == ("data", "fsdp")
    assert _same_batch_sharding(q) == (q,)  # no mesh: untouched


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_key_range_is_the_mask_of_its_span(impl):
    """A decode step's KeyRange (row b sees keys start[b] <= s < end[b]) through the entry point, by XLA and by
    the Pallas kernel (interpreted on CPU), equals the loop reference under the same span as a boolean mask."""
    from ghostvis_jax.model.attention import KeyRange

    q, k, v = _qkv(3, b=3, t=1, s=32)
    start, end = jnp.array([0, 7, 30], jnp.int32), jnp.array([32, 19, 31], jnp.int32)
    span = KeyRange(start, end)
    mask = span.as_mask(32)
    want = _loop_reference(q, k, v, causal=False, mask=np.broadcast_to(mask, (3, 1, 1, 32)))
    got = attention(q, k, v, causal=False, mask=span, implementation=impl)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_pallas_refuses_what_it_does_not_serve():
    q, k, v = _qkv(0)
    with pytest.raises(ValueError, match="single-token decode"):
        attention(q, k, v, causal=True, implementation="pallas")
