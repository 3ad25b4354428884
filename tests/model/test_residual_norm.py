"""The residual add + LayerNorm kernel: its column chunks, the Pallas kernel (interpreted on the CPU, compiled on a
GPU) against the jnp reference, its custom VJP, the fallback, and the SigLIP tower with the kernel in its path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ghostvis_jax.config import SiglipConfig
from ghostvis_jax.model import residual_norm as rn
from ghostvis_jax.model.layers import LayerNorm
from ghostvis_jax.model.siglip import SiglipVisionTower

EPS = 1e-6


def _inputs(rows, width, *, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(loc=offset, scale=2.0, size=(rows, width)), jnp.bfloat16)
    update = jnp.asarray(rng.normal(size=(rows, width)), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(loc=1.0, scale=0.2, size=(width,)), jnp.float32)
    bias = jnp.asarray(rng.normal(scale=0.1, size=(width,)), jnp.float32)
    return x, update, scale, bias


def _f32(a):
    return np.asarray(a, np.float32)


def test_column_chunks_are_power_of_2_pieces_largest_first():
    assert rn.column_chunks(1152) == ((0, 1024), (1024, 128))  # So400m/14
    assert rn.column_chunks(1024) == ((0, 1024),)
    assert rn.column_chunks(1536) == ((0, 1024), (1024, 512))
    assert rn.column_chunks(72) is None          # 64 + 8: a chunk under 16 columns
    assert rn.column_chunks(16 * 31) is None     # 256 + 128 + 64 + 32 + 16: five chunks
    assert rn.column_chunks(0) is None


def test_reference_is_the_plain_sum_and_layer_norm():
    x, update, scale, bias = _inputs(4, 96, seed=1)
    total, normed = rn.reference(x, update, scale, bias, eps=EPS, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(_f32(total), _f32(x + update))
    s = _f32(x + update)
    mean, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    want = (s - mean) / np.sqrt(var + EPS) * _f32(scale) + _f32(bias)
    np.testing.assert_allclose(_f32(normed), want, rtol=2 ** -8, atol=2e-3)


@pytest.mark.parametrize("width", [1152, 128])
@pytest.mark.parametrize("with_update", [True, False])
def test_pallas_kernel_matches_reference(width, with_update):
    x, update, scale, bias = _inputs(16, width, seed=2, offset=3.0)
    update = update if with_update else None
    total, normed = rn.add_layer_norm_pallas(x, update, scale, bias, eps=EPS, dtype=jnp.bfloat16, interpret=True)
    want_total, want_normed = rn.reference(x, update, scale, bias, eps=EPS, dtype=jnp.bfloat16)
    assert total.dtype == jnp.bfloat16 and normed.dtype == jnp.bfloat16 and normed.shape == x.shape
    np.testing.assert_array_equal(_f32(total), _f32(want_total))  # the residual stream: the same rounding
    # The same float32 math and one rounding: at most one bf16 ulp apart (summation order, rsqrt's last bit).
    np.testing.assert_allclose(_f32(normed), _f32(want_normed), rtol=2 ** -7, atol=1e-2)
    # Every chunk of every row written: no row of the output is left as zeros.
    assert np.all(np.abs(_f32(normed)).sum(axis=1) > 0)


@pytest.mark.parametrize("with_update", [True, False])
def test_kernel_gradient_is_the_reference_gradient(with_update):
    x, update, scale, bias = _inputs(8, 128, seed=3)
    update = update if with_update else None
    cot = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

    def loss(fn):
        def f(x, update, scale, bias):
            total, normed = fn(x, update, scale, bias)
            return jnp.sum(normed.astype(jnp.float32) * cot) + jnp.sum(total.astype(jnp.float32))
        return f

    kernel = functools.partial(rn.add_layer_norm, eps=EPS, dtype=jnp.bfloat16, use_kernel=True, interpret=True)
    plain = functools.partial(rn.reference, eps=EPS, dtype=jnp.bfloat16)
    argnums = (0, 1, 2, 3) if with_update else (0, 2, 3)
    got = jax.grad(loss(kernel), argnums=argnums)(x, update, scale, bias)
    want = jax.grad(loss(plain), argnums=argnums)(x, update, scale, bias)
    assert len(got) == len(argnums)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_f32(g), _f32(w))


def test_fallback_off_a_gpu_is_the_reference_and_bad_shapes_are_named():
    x, update, scale, bias = _inputs(6, 48, seed=5)  # 6 rows, 48 = 32 + 16: the kernel would not take the rows
    assert not rn.uses_kernel(6, 48, jnp.bfloat16)
    got = rn.add_layer_norm(x.reshape(2, 3, 48), update.reshape(2, 3, 48), scale, bias, eps=EPS, dtype=jnp.bfloat16)
    want = rn.reference(x, update, scale, bias, eps=EPS, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(_f32(got[0]).reshape(6, 48), _f32(want[0]))
    np.testing.assert_array_equal(_f32(got[1]).reshape(6, 48), _f32(want[1]))
    with pytest.raises(ValueError, match=r"update \(6, 32\) does not match x \(6, 48\)"):
        rn.add_layer_norm(x, update[:, :32], scale, bias, eps=EPS, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="unsupported shapes x \\(6, 48\\)"):
        rn.add_layer_norm_pallas(x, update, scale, bias, eps=EPS, dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="unsupported shapes x \\(2, 8, 48\\)"):  # not 2-d: named, not unpacked
        rn.add_layer_norm_pallas(jnp.zeros((2, 8, 48), jnp.bfloat16), None, scale, bias, eps=EPS,
                                 dtype=jnp.bfloat16, interpret=True)


def test_layer_norm_module_add_and_norm_without_an_update_is_the_module():
    norm = LayerNorm(64, eps=EPS, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = _inputs(8, 64, seed=6)[0]
    total, normed = norm.add_and_norm(x)
    assert total is x
    np.testing.assert_array_equal(_f32(normed), _f32(norm(x)))


def test_siglip_tower_with_the_kernel_in_its_path_matches_the_plain_tower(monkeypatch):
    """On a CPU no projection takes its residual in the fused matmul, so every residual add goes to a norm: with
    the kernel forced (interpreted) the tower's output stays within bf16 rounding of the plain path's."""
    cfg = SiglipConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=32,
                       patch_size=8)
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    pixels = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)  # 2 x 16 patches
    plain = tower(pixels)
    calls = []
    original = rn.add_layer_norm_pallas

    def interpreted(*args, **kwargs):
        calls.append(args[1] is not None)
        return original(*args, **{**kwargs, "interpret": True})

    monkeypatch.setattr(rn, "uses_kernel", lambda *a: True)
    monkeypatch.setattr(rn, "add_layer_norm_pallas", interpreted)
    fused = tower(pixels)
    # The first norm has no pending update; the four after it (and post_layernorm) add one.
    assert calls == [False] + [True] * 4
    np.testing.assert_allclose(_f32(fused), _f32(plain), rtol=2 ** -6, atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("width", [1152, 1024])
def test_compiled_kernel_matches_reference_on_gpu(width):
    x, update, scale, bias = _inputs(8 * 729, width, seed=8, offset=1.0)
    for u in (update, None):
        total, normed = jax.jit(functools.partial(rn.add_layer_norm_pallas, eps=EPS, dtype=jnp.bfloat16))(
            x, u, scale, bias)
        want_total, want_normed = rn.reference(x, u, scale, bias, eps=EPS, dtype=jnp.bfloat16)
        np.testing.assert_array_equal(_f32(total), _f32(want_total))
        np.testing.assert_allclose(_f32(normed), _f32(want_normed), rtol=2 ** -7, atol=1e-2)
