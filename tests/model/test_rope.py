"""RoPE and the q|k|v split (model/rope.py): the Pallas kernels (interpret mode on CPU, compiled on a GPU) against
the jnp reference, their gradient against RoPE's exact transpose, the fallbacks, the FSDP path (shard_map per
device on 8 CPU devices) and a decoder trained through the kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ghostvis_jax import sharding
from ghostvis_jax.config import QwenConfig
from ghostvis_jax.model import qwen2, rope


def _inputs(b, t, kv, group, h, seed=0, dtype=jnp.bfloat16):
    # numpy draws: jax.random here compiled a few dozen tiny programs per shape (~2 s per call on 2 cores)
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.normal(size=(b, t, kv, group + 2, h)), dtype)
    positions = np.arange(t)[None, :] + rng.integers(0, 1000, size=(b, 1))  # rows at other offsets
    cos, sin = rope.rope_cos_sin(jnp.asarray(positions), h, 10000.0)
    cotangents = tuple(jnp.asarray(rng.normal(size=s), dtype)
                       for s in [(b, t, kv * group, h), (b, t, kv, h), (b, t, kv, h)])
    return qkv, cos, sin, cotangents


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _within_an_ulp(got, want):
    """bf16 results of the same float32 math: XLA may contract a multiply-add where Triton does not, which moves
    a rounding now and then, by one bf16 ulp (or by a float32 rounding of the products, where they cancel)."""
    got, want = _f32(got), _f32(want)
    larger = np.maximum(np.abs(got), np.abs(want))  # across a power of 2 the step is the larger side's ulp
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(larger, 2.0 ** -126))) - 7)
    # Where x·cos and rot(x)·sin (inputs of size ~1) nearly cancel, the contracted and the separate float32
    # roundings (~2^-24 each) can move the small result by more than its own ulp: allow that absolute amount.
    assert np.all(np.abs(got - want) <= ulp + 2.0 ** -21), np.abs(got - want).max()


def test_reference_split_is_rope_on_q_and_k_in_hf_head_order():
    qkv, cos, sin, _ = _inputs(1, 4, 2, 3, 16, seed=1, dtype=jnp.float32)
    q, k, v = rope.split_reference(qkv, cos, sin)
    assert q.shape == (1, 4, 6, 16) and k.shape == v.shape == (1, 4, 2, 16)
    c, s = np.asarray(cos)[:, :, None], np.asarray(sin)[:, :, None]
    rot = lambda x: np.concatenate([-x[..., 8:], x[..., :8]], axis=-1)
    x = np.asarray(qkv)
    np.testing.assert_allclose(q[:, :, 4], x[:, :, 1, 1] * c[:, :, 0] + rot(x[:, :, 1, 1]) * s[:, :, 0],
                               rtol=1e-6, atol=1e-6)  # query head 4 = kv head 1, slot 1
    np.testing.assert_allclose(k, x[:, :, :, 3] * c + rot(x[:, :, :, 3]) * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(v, x[:, :, :, 4])


@pytest.mark.parametrize("b,t,kv,group,h", [(2, 24, 2, 6, 128), (1, 16, 2, 3, 32), (4, 8, 1, 1, 64)])
def test_interpreted_kernels_match_the_reference_and_the_exact_transpose(b, t, kv, group, h):
    qkv, cos, sin, cot = _inputs(b, t, kv, group, h, seed=b + t)
    for got, want in zip(rope.split_pallas(qkv, cos, sin, interpret=True), rope.split_reference(qkv, cos, sin)):
        _within_an_ulp(got, want)  # the same float32 math, one rounding
    grad = rope.split_grad_pallas(*cot, cos, sin, interpret=True)
    exact = jax.vjp(lambda x: rope.split_reference(x, cos, sin), qkv.astype(jnp.float32))[1](
        tuple(c.astype(jnp.float32) for c in cot))[0]
    _within_an_ulp(grad, exact)  # RoPE's transpose in float32, rounded once
    # Autodiff in bf16 rounds each product before the sum, so it is the one further from the exact transpose.
    autodiff = jax.vjp(lambda x: rope.split_reference(x, cos, sin), qkv)[1](cot)[0]
    assert np.abs(_f32(grad) - _f32(exact)).max() <= np.abs(_f32(autodiff) - _f32(exact)).max()


def test_custom_vjp_is_the_kernels_and_fallbacks_are_the_reference(monkeypatch):
    qkv, cos, sin, cot = _inputs(2, 8, 2, 2, 32, seed=3)
    out, pullback = jax.vjp(lambda x: rope.split_qkv_rope(x, cos, sin, use_kernel=True, interpret=True), qkv)
    for got, want in zip(out, rope.split_reference(qkv, cos, sin)):
        _within_an_ulp(got, want)
    np.testing.assert_array_equal(_f32(pullback(cot)[0]), _f32(rope.split_grad_pallas(*cot, cos, sin,
                                                                                       interpret=True)))
    calls, kernel = [], rope.split_pallas
    monkeypatch.setattr(rope, "split_pallas", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    odd = _inputs(1, 7, 2, 2, 32, seed=4)  # 7 tokens: not whole blocks of 16
    for got, want in zip(rope.split_qkv_rope(*odd[:3], use_kernel=True, interpret=True),
                         rope.split_reference(*odd[:3])):
        np.testing.assert_array_equal(_f32(got), _f32(want))
    assert not calls
    rope.split_qkv_rope(qkv, cos, sin)  # the kernel is the default on a GPU only
    assert bool(calls) == (jax.default_backend() == "gpu")


def test_unsupported_shapes_are_refused_by_name():
    qkv, cos, sin, _ = _inputs(1, 8, 2, 2, 32)
    with pytest.raises(ValueError, match=r"qkv \(1, 8, 2, 4, 32\) bfloat16, cos \(1, 8, 32\)"):
        rope.split_pallas(qkv, cos, sin, interpret=True)  # 8 tokens
    qkv, cos, sin, _ = _inputs(1, 16, 2, 2, 24)
    with pytest.raises(ValueError, match="H/2 a power of 2"):
        rope.split_pallas(qkv, cos, sin, interpret=True)
    _, cos, sin, (dq, dk, dv) = _inputs(1, 16, 2, 2, 32)
    with pytest.raises(ValueError, match=r"split_grad_pallas: unsupported shapes dq \(1, 16, 4, 32\) bfloat16, dk "
                                         r"\(1, 16, 2, 32\), dv \(1, 16, 2, 16\)"):
        rope.split_grad_pallas(dq, dk, dv[..., :16], cos, sin, interpret=True)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_fsdp_runs_the_kernels_per_device_without_gathering_rows(data, fsdp):
    mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices("cpu"))  # the 8 fake CPU devices
    qkv, cos, sin, cot = _inputs(8, 16, 2, 2, 32, seed=5)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    qkv, cos, sin, cot = jax.device_put((qkv, cos, sin, cot), rows)

    def loss(x):
        outs = rope.split_qkv_rope(x, cos, sin, use_kernel=True, interpret=True)
        return sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32)) for o, c in zip(outs, cot))

    fn = jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(mesh):
        value, grad = fn(qkv)
        hlo = fn.lower(qkv).compile().as_text()
    assert "all-gather" not in hlo  # only the loss's scalar is reduced across devices
    assert grad.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(_f32(grad), _f32(rope.split_grad_pallas(*cot, cos, sin, interpret=True)))
    want = sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32))
               for o, c in zip(rope.split_reference(qkv, cos, sin), cot))
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)


def test_decoder_loss_and_gradients_through_the_kernels_match_the_plain_decoder(monkeypatch):
    cfg = QwenConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True)
    model = qwen2.Qwen2Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 16, 64)).astype(jnp.bfloat16)

    def loss(m):
        return jnp.mean(jnp.square(m(x)[0].astype(jnp.float32)))

    plain_loss, plain_grads = nnx.jit(nnx.value_and_grad(loss))(model)
    monkeypatch.setattr(qwen2, "split_qkv_rope", functools.partial(rope.split_qkv_rope, use_kernel=True,
                                                                   interpret=True))
    kernel_loss, kernel_grads = nnx.jit(nnx.value_and_grad(loss))(model)  # a new jit: traced with the kernels
    np.testing.assert_allclose(float(kernel_loss), float(plain_loss), rtol=1e-3)
    # The kernels' gradient differs from autodiff's by at most an ulp of bf16 per element of dqkv; downstream
    # that stays a small relative difference of each leaf as a whole.
    for got, want in zip(jax.tree.leaves(kernel_grads), jax.tree.leaves(plain_grads)):
        assert np.linalg.norm(_f32(got) - _f32(want)) <= 2e-2 * np.linalg.norm(_f32(want))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernels need an NVIDIA GPU")
def test_compiled_kernels_on_gpu_match_the_reference():
    qkv, cos, sin, cot = _inputs(2, 2048, 2, 6, 128, seed=8)  # Qwen2.5-1.5B's heads
    for got, want in zip(jax.jit(rope.split_pallas)(qkv, cos, sin), rope.split_reference(qkv, cos, sin)):
        _within_an_ulp(got, want)
    grad = jax.jit(rope.split_grad_pallas)(*cot, cos, sin)
    exact = jax.vjp(lambda x: rope.split_reference(x, cos, sin), qkv.astype(jnp.float32))[1](
        tuple(c.astype(jnp.float32) for c in cot))[0]
    _within_an_ulp(grad, exact)
