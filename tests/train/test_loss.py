"""The hand-written cross-entropy backward against plain autodiff of log-softmax (float32, so exact to rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.train.loss import chunked_cross_entropy


def reference(w, h, targets, mask):
    logits = jnp.einsum("btd,vd->btv", h, w)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunk", [16, 5, 64])  # one chunk, chunks with padding, chunk > T
def test_value_and_gradients_match_autodiff(chunk):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 16, 8, 50
    w = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32)

    def ours(w, h):
        return chunked_cross_entropy(w, h, targets, mask, chunk)[0]

    def ref(w, h):
        return reference(w, h, targets, mask)[0]

    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(w, h)
    ref_value, ref_grads = jax.value_and_grad(ref, argnums=(0, 1))(w, h)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-5)
    assert chunked_cross_entropy(w, h, targets, mask, chunk)[1] == float(mask.sum())


def test_bf16_logits_are_those_autodiff_would_see():
    """In bf16 the forward value equals log-softmax of the bf16 logits computed in float32."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(40, 8)), jnp.bfloat16)
    h = jnp.asarray(rng.normal(size=(1, 12, 8)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 40, size=(1, 12)), jnp.int32)
    mask = jnp.ones((1, 12), jnp.float32)
    logits = jnp.einsum("btd,vd->btv", h, w).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(chunked_cross_entropy(w, h, targets, mask, 4)[0], nll.sum(), rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_head_weight_gives_the_models_logits(tied):
    """The loss multiplies by `head_weight()` ([V, D]); tied or not, that is what `logits()` computes."""
    import dataclasses

    from flax import nnx

    from ghostvis_jax.model.qwen2 import Qwen2Decoder
    from ghostvis_jax.testing.tiny_training import tiny_model_config

    cfg = dataclasses.replace(tiny_model_config().llm, tie_word_embeddings=tied)
    llm = Qwen2Decoder(cfg, rngs=nnx.Rngs(0))
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), jnp.float32)
    logits = llm.logits(h)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    got, _ = chunked_cross_entropy(llm.head_weight(), h, targets, mask, 4)
    np.testing.assert_allclose(got, nll.sum(), rtol=1e-5)
