"""The SwiGLU activation's one-pass backward: the jnp reference against autodiff, the Pallas kernel (interpret
mode on CPU) against the reference, and the FSDP path (shard_map per device) on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ghostvis_jax import sharding
from ghostvis_jax.model import swiglu as sw


def _plain(gate_up):
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    gate_up = jnp.asarray(rng.normal(scale=3.0, size=shape), dtype)  # wide enough to reach sigmoid's tails
    d_out = jnp.asarray(rng.normal(size=shape[:-2] + shape[-1:]), dtype)
    return gate_up, d_out


def test_reference_grad_matches_autodiff():
    gate_up, d_out = _inputs((2, 3, 2, 40), jnp.float32)
    want = jax.vjp(_plain, gate_up)[1](d_out)[0]
    got = sw.swiglu_grad_reference(gate_up, d_out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_custom_vjp_forward_and_gradient_match_the_plain_expression():
    gate_up, d_out = _inputs((2, 8, 2, 64), jnp.float32, seed=1)
    np.testing.assert_array_equal(sw.swiglu(gate_up), _plain(gate_up))
    loss = lambda f: lambda x: jnp.sum(f(x) * d_out)
    np.testing.assert_allclose(jax.grad(loss(sw.swiglu))(gate_up), jax.grad(loss(_plain))(gate_up),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 16, 2, 256), (32, 2, 384)])
def test_pallas_kernel_matches_reference(shape):
    gate_up, d_out = _inputs(shape, jnp.bfloat16, seed=2)
    assert sw.kernel_block_cols(shape) == (256 if shape[-1] % 256 == 0 else 128)
    got = sw.swiglu_grad_pallas(gate_up, d_out, interpret=True)
    want = sw.swiglu_grad_reference(gate_up, d_out)
    assert got.shape == gate_up.shape and got.dtype == jnp.bfloat16
    # Same float32 math, one rounding to bf16: at most one bf16 ulp apart (exp may differ in its last bit).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)
    # Both halves written (the gate half differs from the up half for random inputs).
    assert not np.allclose(np.asarray(got[..., 0, :], np.float32), np.asarray(got[..., 1, :], np.float32))


@pytest.mark.parametrize("shape", [(3, 5, 2, 256), (2, 16, 2, 96), (2, 16, 3, 256)])
def test_kernel_declines_shapes_it_cannot_tile_and_the_grad_falls_back(shape):
    assert sw.kernel_block_cols(shape) is None
    if shape[-2] == 2:
        gate_up, d_out = _inputs(shape, jnp.float32, seed=3)
        got = sw.swiglu_grad(gate_up, d_out, use_kernel=True, interpret=True)
        np.testing.assert_array_equal(got, sw.swiglu_grad_reference(gate_up, d_out))
    with pytest.raises(ValueError, match="unsupported shapes"):
        sw.swiglu_grad_pallas(jnp.zeros(shape), jnp.zeros(shape[:-2] + shape[-1:]), interpret=True)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_fsdp_runs_the_kernel_per_device_without_gathering_rows(data, fsdp):
    mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices("cpu"))  # the 8 fake CPU devices, also on a GPU host
    gate_up, d_out = _inputs((8, 16, 2, 128), jnp.bfloat16, seed=4)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    gate_up, d_out = jax.device_put(gate_up, rows), jax.device_put(d_out, rows)
    fn = jax.jit(lambda a, b: sw.swiglu_grad(a, b, use_kernel=True, interpret=True))
    with jax.set_mesh(mesh):
        got = fn(gate_up, d_out)
        hlo = fn.lower(gate_up, d_out).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    assert got.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(sw.swiglu_grad_reference(gate_up, d_out), np.float32),
                               rtol=2 ** -7, atol=1e-6)


def test_tensor_parallel_mesh_takes_the_reference_path(monkeypatch):
    """With the intermediate dim sharded over `tensor` the kernel would see half-width rows: use jnp instead."""
    calls = []
    kernel = sw.swiglu_grad_pallas
    monkeypatch.setattr(sw, "swiglu_grad_pallas", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gate_up, d_out = _inputs((8, 16, 2, 128), jnp.float32, seed=6)
    want = sw.swiglu_grad_reference(gate_up, d_out)
    for (data, fsdp, tensor), kernel_used in (((1, 4, 2), False), ((1, 8, 1), True)):
        calls.clear()
        mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices("cpu"))
        with jax.set_mesh(mesh):
            got = jax.jit(lambda a, b: sw.swiglu_grad(a, b, use_kernel=True, interpret=True))(gate_up, d_out)
        assert bool(calls) is kernel_used, (data, fsdp, tensor)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs an NVIDIA GPU")
def test_compiled_kernel_on_gpu_matches_reference():
    gate_up, d_out = _inputs((4, 64, 2, 8960), jnp.bfloat16, seed=5)
    got = jax.jit(sw.swiglu_grad_pallas)(gate_up, d_out)
    want = sw.swiglu_grad_reference(gate_up, d_out)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)
