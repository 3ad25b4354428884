"""The SwiGLU activation's hand-written backward against autodiff of silu(gate) * up."""

import jax
import jax.numpy as jnp
import numpy as np

from ghostvis_jax.model.qwen2 import swiglu


def test_value_and_gradients_match_autodiff_of_silu():
    rng = np.random.default_rng(0)
    gate = jnp.asarray(rng.normal(size=(3, 5, 7)) * 4, jnp.float32)
    up = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)

    def ref(g, u):
        return jax.nn.silu(g) * u

    np.testing.assert_allclose(swiglu(gate, up), ref(gate, up), rtol=1e-6, atol=1e-6)
    ours = jax.vjp(swiglu, gate, up)[1](cot)
    theirs = jax.vjp(ref, gate, up)[1](cot)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_is_rounded_once_from_float32():
    rng = np.random.default_rng(1)
    gate = jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)
    up = jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)
    exact = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
    out = swiglu(gate, up)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), exact, rtol=2 ** -8, atol=1e-6)
