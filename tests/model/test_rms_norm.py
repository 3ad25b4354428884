"""Qwen2's residual add + RMSNorm kernels: the forward and backward Pallas passes (interpreted on the CPU, compiled
on a GPU) against the jnp reference and its float32 autodiff, the fallbacks, the FSDP path on 8 CPU devices, the
module and the decoder with the adds moved into the norms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ghostvis_jax import sharding
from ghostvis_jax.model import rms_norm as rn
from ghostvis_jax.model.layers import RMSNorm

EPS = 1e-6


@pytest.fixture(autouse=True)
def few_rows_on_the_cpu(request, monkeypatch):
    """The kernels' 1024-row minimum keeps decode steps on XLA; the interpreted tests use small inputs, and run on
    the CPU on any host, so their arithmetic (and tolerances) do not depend on the machine. The decoder test stays
    on the default backend: its other layers pick their kernels by `jax.default_backend()`, which a CPU default
    device does not change, so on a GPU host they would lower GPU kernels (cuDNN attention) for CPU arrays."""
    monkeypatch.setattr(rn, "MIN_ROWS", 8)
    if "gpu" in request.node.name or "decoder" in request.node.name:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _inputs(shape, *, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(scale=2.0, size=shape), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(loc=1.0, scale=0.3, size=shape[-1:]), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    return x, scale, dy


def _f32(a):
    return np.asarray(a, np.float32)


def _exact_grads(x, scale, dy):
    """The reference's gradients in float32 (no bf16 rounding inside), the standard the kernel is held to."""
    f = lambda a, s: s * (a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + EPS))
    _, pullback = jax.vjp(f, x.astype(jnp.float32), scale.astype(jnp.float32))
    return pullback(dy.astype(jnp.float32))


@pytest.mark.parametrize("width", [48, 1536])  # 32 + 16; Qwen2.5-1.5B's 1024 + 512
def test_forward_kernel_is_the_reference(width):
    x, scale, update = _inputs((24, width))
    for upd in (None, update):
        total, y, rstd = rn.forward_pallas(x, upd, scale, eps=EPS, interpret=True)
        want_total = x if upd is None else x + upd
        np.testing.assert_array_equal(_f32(total), _f32(want_total))  # rounded as XLA rounds the add
        want = rn.reference(want_total, scale, eps=EPS)
        assert y.dtype == jnp.bfloat16 and rstd.shape == (24,)
        # the normalized and the scaled values are each rounded to bf16: a flip in the first moves the second by
        # up to two ulps (seen on a GPU, whose rsqrt differs from the CPU's in the last float32 bits)
        np.testing.assert_allclose(_f32(y), _f32(want), rtol=2 ** -6, atol=0)
        t32 = _f32(want_total)
        np.testing.assert_allclose(_f32(rstd), 1 / np.sqrt((t32 * t32).mean(-1) + EPS), rtol=1e-6)


@pytest.mark.parametrize("width", [48, 1536])
def test_backward_kernel_is_the_exact_gradient(width):
    x, scale, dy = _inputs((16, width), seed=1)
    d_total = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.bfloat16)
    _, _, rstd = rn.forward_pallas(x, None, scale, eps=EPS, interpret=True)
    want, want_scale = _exact_grads(x, scale, dy)
    dx = rn.backward_pallas(x, dy, None, scale, rstd, interpret=True)
    assert dx.dtype == x.dtype
    np.testing.assert_allclose(_f32(dx), _f32(want), rtol=2 ** -8, atol=1e-3)
    dx, partial = rn.backward_pallas(x, dy, d_total, scale, rstd, scale_grad=True, interpret=True)
    np.testing.assert_allclose(_f32(dx), _f32(want) + _f32(d_total), rtol=2 ** -7, atol=1e-2)
    assert partial.shape == (16 // rn.BLOCK_ROWS, width)
    np.testing.assert_allclose(partial.sum(0), _f32(want_scale), rtol=1e-2, atol=0.05)


def test_gradients_through_rms_norm_match_autodiff_of_the_reference():
    x, scale, dy = _inputs((2, 8, 64), seed=2)
    loss = lambda fn: lambda a, s: jnp.sum(fn(a, s).astype(jnp.float32) * dy.astype(jnp.float32))
    kernel = functools.partial(rn.rms_norm, eps=EPS, use_kernel=True, interpret=True)
    got = jax.grad(loss(kernel), argnums=(0, 1))(x, scale)
    plain = jax.grad(loss(functools.partial(rn.reference, eps=EPS)), argnums=(0, 1))(x, scale)
    exact = _exact_grads(x, scale, dy)
    np.testing.assert_allclose(_f32(kernel(x, scale)), _f32(rn.reference(x, scale, eps=EPS)), rtol=2 ** -7)
    for g, p, e in zip(got, plain, exact):
        assert g.dtype == p.dtype and g.shape == p.shape
        # on average closer to the exact gradient than bf16 autodiff is, or as close
        assert np.abs(_f32(g) - _f32(e)).mean() <= np.abs(_f32(p) - _f32(e)).mean() + 1e-6
    np.testing.assert_allclose(_f32(got[1]), _f32(exact[1]), rtol=2 ** -7, atol=0.05)


def test_add_and_norm_gradients_reach_x_and_the_update_alike():
    """Both outputs used: x and the update get the sum's cotangent plus the norm's backward, as autodiff gives."""
    x, scale, dy = _inputs((2, 8, 64), seed=8)
    update = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.bfloat16)
    d_total = jnp.asarray(np.random.default_rng(10).normal(size=x.shape), jnp.bfloat16)

    def loss(fn):
        def f(a, u, s):
            total, y = fn(a, u, s)
            return jnp.sum(total.astype(jnp.float32) * d_total.astype(jnp.float32)
                           + y.astype(jnp.float32) * dy.astype(jnp.float32))
        return f

    kernel = functools.partial(rn.add_rms_norm, eps=EPS, use_kernel=True, interpret=True)
    plain = functools.partial(rn.add_rms_norm, eps=EPS, use_kernel=False)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(x, update, scale)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, update, scale)
    np.testing.assert_array_equal(_f32(got[0]), _f32(got[1]))
    for g, w in zip(got, want):
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=2 ** -6, atol=0.05)
    total, y = kernel(x, update, scale)
    np.testing.assert_array_equal(_f32(total), _f32(x + update))


def test_decoder_with_the_kernels_matches_the_reference_path(monkeypatch):
    """The decoder with every residual add inside the next norm's kernel: hidden states and gradients as with
    the jnp path (bf16, so within rounding)."""
    from flax import nnx

    from ghostvis_jax.model.qwen2 import Qwen2Decoder
    from ghostvis_jax.testing.tiny_training import tiny_model_config

    cfg = tiny_model_config(num_layers=2).llm
    model = Qwen2Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 8, cfg.hidden_size)), jnp.bfloat16)
    graph, params = nnx.split(model)
    probe = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), jnp.float32)

    def run(p, a):  # a random projection: the squared norm of an RMSNorm's output would be a constant
        return jnp.sum(nnx.merge(graph, p)(a)[0].astype(jnp.float32) * probe)

    want, want_grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1)))(params, x)
    calls = []
    original = rn.add_rms_norm
    monkeypatch.setattr(rn, "add_rms_norm", lambda *a, **k: calls.append(1) or original(
        *a, **k, use_kernel=True, interpret=True))
    got, grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1)))(params, x)
    assert len(calls) == 2 * 2 + 1  # two norms per layer, then the final norm
    np.testing.assert_allclose(float(got), float(want), rtol=2e-2)
    # bf16 gradients from two rounding paths: compared as whole tensors (elementwise, cancellations dominate)
    for g, w in zip(jax.tree.leaves((grads[1], grads[0])), jax.tree.leaves((want_grads[1], want_grads[0]))):
        assert g.shape == w.shape
        assert np.linalg.norm(_f32(g) - _f32(w)) <= 0.03 * np.linalg.norm(_f32(w)) + 1e-6, g.shape


@pytest.mark.parametrize("shape,dtype", [((2, 3, 64), jnp.bfloat16),  # 6 rows: not blocks of 8
                                         ((2, 8, 1000), jnp.bfloat16),  # 1000 needs an 8-column chunk
                                         ((2, 8, 64), jnp.float32)])
def test_shapes_the_kernel_cannot_take_run_the_reference_and_are_named(shape, dtype, monkeypatch):
    x = jnp.ones(shape, dtype)
    scale = jnp.full(shape[-1:], 2.0, dtype)
    with pytest.raises(ValueError, match=r"unsupported shapes x \(" + str(shape[0] * shape[1])):
        rn.forward_pallas(x.reshape(-1, shape[-1]), None, scale, eps=EPS, interpret=True)
    monkeypatch.setattr(rn, "forward_pallas", lambda *a, **k: pytest.fail("the kernel ran"))
    np.testing.assert_allclose(_f32(rn.rms_norm(x, scale, eps=EPS, use_kernel=True)), 2.0, rtol=1e-5)


@pytest.mark.parametrize("trained", [True, False])
def test_the_scale_gradient_is_computed_only_for_a_trained_scale(trained, monkeypatch):
    """A frozen layer's scale is not differentiated: its backward pass writes dx only."""
    seen = []
    kernel = rn.backward_pallas
    monkeypatch.setattr(rn, "backward_pallas", lambda *a, **k: seen.append(k["scale_grad"]) or kernel(*a, **k))
    x, scale, dy = _inputs((2, 8, 64), seed=6)
    loss = lambda a, s: jnp.sum(rn.rms_norm(a, s, eps=EPS, use_kernel=True, interpret=True).astype(jnp.float32)
                                * dy.astype(jnp.float32))
    grads = jax.grad(loss, argnums=(0, 1) if trained else 0)(x, scale)
    assert seen == [trained]
    exact = _exact_grads(x, scale, dy)
    np.testing.assert_allclose(_f32(grads[0] if trained else grads), _f32(exact[0]), rtol=2 ** -7, atol=1e-3)


def test_decode_sized_inputs_stay_with_xla(monkeypatch):
    monkeypatch.setattr(rn, "MIN_ROWS", 1024)
    assert not rn.kernel_supported(64, 1536, jnp.bfloat16)
    assert rn.kernel_supported(8 * 2048, 1536, jnp.bfloat16)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_fsdp_runs_both_kernels_per_device_without_gathering_rows(data, fsdp):
    mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices("cpu"))  # the 8 fake CPU devices, also on a GPU host
    x, scale, dy = _inputs((8, 8, 48), seed=3)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x, dy = jax.device_put(x, rows), jax.device_put(dy, rows)
    norm = functools.partial(rn.rms_norm, eps=EPS, use_kernel=True, interpret=True)
    fn = jax.jit(lambda a, s, d: jax.vjp(norm, a, s)[1](d)[0])
    with jax.set_mesh(mesh):
        dx = fn(x, scale, dy)
        hlo = fn.lower(x, scale, dy).compile().as_text()
    assert "all-gather" not in hlo
    assert {s.data.shape for s in dx.addressable_shards} == {(1, 8, 48)}
    np.testing.assert_allclose(_f32(dx), _f32(_exact_grads(x, scale, dy)[0]), rtol=2 ** -8, atol=1e-3)


def test_module_runs_the_kernel_where_it_applies(monkeypatch):
    calls = []
    kernel = rn.forward_pallas
    monkeypatch.setattr(rn, "USE_KERNEL_ON_GPU", True)
    monkeypatch.setattr(rn.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(rn, "forward_pallas", lambda *a, **k: calls.append(1) or kernel(*a, **{**k, "interpret": True}))
    norm = RMSNorm(64, eps=EPS, dtype=jnp.bfloat16)
    x, _, _ = _inputs((2, 8, 64), seed=4)
    got = norm(x)
    assert calls
    np.testing.assert_allclose(_f32(got), _f32(rn.reference(x, jnp.ones(64, jnp.bfloat16), eps=EPS)), rtol=2 ** -7)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernels need an NVIDIA GPU")
def test_compiled_kernels_on_gpu(monkeypatch):
    monkeypatch.setattr(rn, "MIN_ROWS", 1024)
    x, scale, dy = _inputs((4, 512, 1536), seed=5)
    y, pullback = jax.vjp(jax.jit(functools.partial(rn.rms_norm, eps=EPS)), x, scale)
    dx, d_scale = pullback(dy)
    np.testing.assert_allclose(_f32(y), _f32(rn.reference(x, scale, eps=EPS)), rtol=2 ** -7)
    want_dx, want_scale = _exact_grads(x, scale, dy)
    np.testing.assert_allclose(_f32(dx), _f32(want_dx), rtol=2 ** -8, atol=1e-3)
    np.testing.assert_allclose(_f32(d_scale), _f32(want_scale), rtol=2 ** -7, atol=0.5)
    hlo = jax.jit(jax.grad(lambda a: jnp.sum(rn.rms_norm(a, scale, eps=EPS).astype(jnp.float32)))).lower(x).as_text()
    assert "rms_norm_grad" in hlo  # the kernels ran, not the reference
