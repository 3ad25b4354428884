"""The hand-written cross-entropy backward against plain autodiff of log-softmax (float32, so exact to rounding),
and the chunks without loss tokens skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ghostvis_jax import sharding
from ghostvis_jax.train.loss import chunked_cross_entropy


def reference(w, h, targets, mask):
    logits = jnp.einsum("btd,vd->btv", h, w)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunk", [16, 11, 64])  # two chunks, three with padding, one chunk (> the 32 tokens)
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


def _probe(seed=4, b=2, t=16, d=8, v=50, per_row=4):
    """Rows with `per_row` loss tokens at random positions and NaN hidden states everywhere else: a chunk of the
    NaN positions that ran would make the loss (or a gradient) NaN."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    mask = np.zeros((b, t), np.float32)
    for row in mask:
        row[rng.choice(t, per_row, replace=False)] = 1.0
    h = rng.normal(size=(b, t, d))
    h[mask == 0] = np.nan
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    return w, jnp.asarray(h, jnp.float32), targets, jnp.asarray(mask)


@pytest.mark.parametrize("train_head", [True, False])
def test_chunks_past_the_last_loss_token_are_skipped(train_head):
    """8 loss tokens in a 32-token stream cut in chunks of 8: chunk 0 holds all of them, chunks 1-3 only NaN
    positions, which must not run, forward or backward. The gradient at a position without a loss is exactly 0."""
    w, h, targets, mask = _probe()
    keep = jnp.where(mask[..., None] > 0, h, 0.0)
    ref_value, ref_grads = jax.value_and_grad(lambda w, h: reference(w, h, targets, mask)[0], argnums=(0, 1))(w, keep)
    argnums = (0, 1) if train_head else (1,)
    value, grads = jax.jit(jax.value_and_grad(lambda w, h: chunked_cross_entropy(w, h, targets, mask, 8)[0],
                                              argnums=argnums))(w, h)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grads[-1], ref_grads[1], rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads[-1])[np.asarray(mask) == 0] == 0.0)
    if train_head:
        np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
    # One chunk holds the NaN positions too (chunk >= the stream): the probe must show it.
    assert np.isnan(chunked_cross_entropy(w, h, targets, mask, 64)[0])


def test_a_batch_without_loss_tokens_runs_no_chunk():
    w, h, targets, _ = _probe()
    mask = jnp.zeros(targets.shape, jnp.float32)
    value, grad = jax.value_and_grad(lambda h: chunked_cross_entropy(w, h, targets, mask, 8)[0])(h)
    assert value == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_each_device_orders_its_own_rows(data, fsdp):
    """Under a mesh each device's 2 rows (of 4 positions) form one stream, loss tokens first, with no row moving
    between devices (no all-gather). Device 0 has 4 loss tokens, the others 2; in chunks of 2 per device, chunks 0-1
    run on every device and chunks 2-3 on none. So NaN hidden states at each device's last 4 stream positions
    (its last non-loss positions in row order) must not reach the loss or the gradient."""
    mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices("cpu"))
    w, h, targets, mask = _probe(seed=5, b=16, t=4, per_row=1)
    mask = np.asarray(mask.at[:2].set(0.0).at[:2, :2].set(1.0))  # device 0: 2 loss tokens in each row
    h = np.nan_to_num(np.asarray(h), nan=0.5)
    for device in range(8):
        flat = np.arange(8) + 8 * device
        skipped = [p for p in flat if mask.reshape(-1)[p] == 0][-4:]
        h.reshape(-1, h.shape[-1])[skipped] = np.nan
    h, mask = jnp.asarray(h), jnp.asarray(mask)
    keep = jnp.where(jnp.isnan(h), 0.0, h)
    ref_value, ref_grad = jax.value_and_grad(lambda h: reference(w, h, targets, mask)[0])(keep)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(a, rows) for a in (h, targets, mask)]
    fn = jax.jit(jax.value_and_grad(lambda h, t, m: chunked_cross_entropy(w, h, t, m, 2)[0]))
    with jax.set_mesh(mesh):
        value, grad = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
