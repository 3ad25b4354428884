"""The loss's one-pass row log-sum-exp: the Pallas kernel (interpret mode on CPU) against float64 numpy, its
fallbacks, the FSDP path (shard_map per device) on 8 CPU devices, and the cross-entropy through it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ghostvis_jax import sharding
from ghostvis_jax.train import logsumexp as lse
from ghostvis_jax.train import loss as loss_module


def _exact(x) -> np.ndarray:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("shape,dtype,blocks", [
    ((2, 3, 2 * (2 * 2048 + 48)), jnp.bfloat16, {}),  # as words: two full blocks, then chunks of 32, 16
    ((4, 256), jnp.float32, dict(block_rows=2, block_cols=64)),  # whole blocks only, two rows per program
    ((3, 1, 96), jnp.float32, dict(block_cols=128)),  # no full block: chunks of 64 and 32
])
def test_kernel_matches_float64(shape, dtype, blocks):
    x = jnp.asarray(np.random.default_rng(0).normal(scale=4.0, size=shape), dtype)
    got = lse.logsumexp_pallas(x, interpret=True, **blocks)
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _exact(x), rtol=2e-7, atol=2e-6)


def test_a_large_value_after_small_ones_rescales_the_running_sum():
    """The row max sits in the last chunk: every earlier block's sum must be rescaled, not overflow or vanish."""
    x = np.zeros((2, 160), np.float32)
    x[0, -1], x[1, 5] = 90.0, -90.0
    got = lse.logsumexp_pallas(jnp.asarray(x), block_cols=64, interpret=True)
    np.testing.assert_allclose(np.asarray(got), _exact(x), rtol=1e-7)


def test_rows_of_minus_infinity_give_minus_infinity_not_nan():
    x = jnp.full((2, 64), -jnp.inf, jnp.float32).at[1, 3].set(1.5)
    got = np.asarray(lse.logsumexp_pallas(x, block_cols=32, interpret=True))
    assert got[0] == -np.inf and got[1] == pytest.approx(1.5)


def test_column_blocks_and_the_int32_limit():
    assert lse.column_blocks(151936 // 2, 2048) == (37, ((75776, 128), (75904, 64)))  # bf16 read as word pairs
    assert lse.column_blocks(4096, 2048) == (2, ())
    assert lse.column_blocks(100, 64) is None  # 100 = 64 + 32 + 4: a 4-column chunk
    # train-sft's chunk: 2.5e9 bf16 logits are 1.2e9 words; as float32 they are past int32 offsets
    assert lse.kernel_supported(16384, 151936, jnp.bfloat16)
    assert not lse.kernel_supported(16384, 151936, jnp.float32)
    assert not lse.kernel_supported(8, 4097 * 2 + 1, jnp.bfloat16)  # odd width: no word pairs
    assert not lse.kernel_supported(8, 4096, jnp.float16)


@pytest.mark.parametrize("shape", [(3, 100), (5, 128)])  # a chunk under 16 columns; 5 rows in blocks of 2
def test_unsupported_shapes_are_refused_by_name_and_row_logsumexp_falls_back(shape, monkeypatch):
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    with pytest.raises(ValueError, match=r"unsupported logits \(" + ", ".join(map(str, shape))):
        lse.logsumexp_pallas(x, block_rows=2, interpret=True)
    monkeypatch.setattr(lse, "BLOCK_ROWS", 2)
    monkeypatch.setattr(lse, "logsumexp_pallas", lambda *a, **k: pytest.fail("the kernel ran"))
    np.testing.assert_allclose(lse.row_logsumexp(x, use_kernel=True), _exact(x), rtol=1e-6)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_fsdp_runs_the_kernel_per_device_without_gathering_rows(data, fsdp):
    mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices("cpu"))  # the 8 fake CPU devices, also on a GPU host
    x = jnp.asarray(np.random.default_rng(2).normal(scale=3.0, size=(8, 4, 160)), jnp.bfloat16)
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    fn = jax.jit(lambda a: lse.row_logsumexp(a, use_kernel=True, interpret=True))
    with jax.set_mesh(mesh):
        got = fn(x)
        hlo = fn.lower(x).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    assert {s.data.shape for s in got.addressable_shards} == {(1, 4)}  # each device's own row
    np.testing.assert_allclose(np.asarray(got), _exact(x), rtol=2e-7, atol=2e-6)


def test_cross_entropy_through_the_kernel_matches_autodiff(monkeypatch):
    """The loss's value and both gradients with the kernel's log-normalizer, against autodiff of log-softmax."""
    monkeypatch.setattr(loss_module, "row_logsumexp",
                        functools.partial(lse.row_logsumexp, use_kernel=True, interpret=True))
    rng = np.random.default_rng(3)
    b, t, d, v = 2, 8, 16, 2048 + 64
    w = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)

    def reference(w, h):
        logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)

    value, grads = jax.value_and_grad(
        lambda w, h: loss_module.chunked_cross_entropy(w, h, targets, mask, 4)[0], argnums=(0, 1))(w, h)
    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(w, h)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs an NVIDIA GPU")
def test_compiled_kernel_on_gpu_matches_float64():
    x = jnp.asarray(np.random.default_rng(4).normal(scale=4.0, size=(64, 151936)), jnp.bfloat16)
    got = jax.jit(lse.logsumexp_pallas)(x)
    np.testing.assert_allclose(np.asarray(got), _exact(x), rtol=2e-7, atol=5e-6)
    assert jax.jit(lambda a: lse.row_logsumexp(a) - lse.reference(a))(x).shape == (64,)  # the default path runs
