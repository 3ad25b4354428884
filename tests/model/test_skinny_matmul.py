"""The decode step's few-row GEMM kernels (interpret mode off the GPU) against float32 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.model import skinny_matmul


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


def _close(got, want):
    """Within bf16 rounding of the float32 reference (a few ulps of its largest entry)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("splits", [None, 1, 2])
def test_matmul_matches_float32(rows, splits):
    rng = np.random.default_rng(rows)
    x, w = _bf16(rng, (rows, 256)), _bf16(rng, (256, 192), 0.1)
    got = skinny_matmul.matmul(x, w, splits=splits)
    assert got.dtype == jnp.bfloat16
    _close(got, x.astype(jnp.float32) @ w.astype(jnp.float32))


@pytest.mark.parametrize("rows", [1, 64])
def test_matmul_with_bias_rounds_like_xla(rows):
    """The product is rounded, then the bias added and rounded again: what XLA's dot + bias add compute."""
    rng = np.random.default_rng(rows + 1)
    x, w, b = _bf16(rng, (rows, 256)), _bf16(rng, (256, 192), 0.1), _bf16(rng, (192,))
    got = skinny_matmul.matmul(x, w, b)
    product = (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(jnp.bfloat16)
    _close(got, product.astype(jnp.float32) + b.astype(jnp.float32))
    assert np.abs(np.asarray(got, np.float32) - np.asarray(product, np.float32)).max() > 0.5  # the bias is in


def test_dense_decode_step_flattens_fused_outputs_and_bias(monkeypatch):
    """A q|k|v-like Dense (kernel [D, K, G + 2, H], bias [K, G + 2, H]) through the kernel: XLA's result."""
    from flax import nnx

    from ghostvis_jax.model.layers import Dense

    monkeypatch.setattr(skinny_matmul, "IMPLEMENTATION", "pallas")
    dense = Dense(128, (2, 4, 32), use_bias=True, axes=("embed", "kv_heads", None, None), rngs=nnx.Rngs(0),
                  dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dense.bias[...] = jax.random.normal(jax.random.key(1), dense.bias.shape, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (16, 1, 128), jnp.bfloat16)
    got, want = dense.decode_step(x), dense(x)
    assert got.shape == want.shape == (16, 1, 2, 4, 32)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -9)


def test_decode_mlp_matches_float32_swiglu():
    rng = np.random.default_rng(0)
    x, gate_up, down = _bf16(rng, (8, 128)), _bf16(rng, (128, 2, 256), 0.1), _bf16(rng, (256, 128), 0.1)
    y = x.astype(jnp.float32) @ gate_up.astype(jnp.float32).reshape(128, 512)
    h = (jax.nn.silu(y[:, :256]) * y[:, 256:]).astype(jnp.bfloat16)  # the kernel rounds the product once
    want = h.astype(jnp.float32) @ down.astype(jnp.float32)
    _close(skinny_matmul.decode_mlp(x, gate_up, down), want)
    _close(skinny_matmul.decode_mlp(x, gate_up, down, splits=1), want)
    # gate and up are not interchangeable: swapping them must change the result
    swapped = skinny_matmul.decode_mlp(x, gate_up[:, ::-1], down)
    assert np.abs(np.asarray(swapped, np.float32) - np.asarray(want)).max() > 0.1 * np.abs(np.asarray(want)).max()


def test_split_count_keeps_programs_near_one_per_sm():
    # Qwen2.5-1.5B: o_proj [1536, 1536] (24 column blocks, 12 K blocks), down_proj [8960, 1536] (70 K blocks)
    assert skinny_matmul.num_splits(1536, 1536) == 4
    assert skinny_matmul.num_splits(8960, 1536) == 5
    assert skinny_matmul.num_splits(1536, 8192) == 1   # 128 column blocks already
    assert skinny_matmul.num_splits(128, 64) == 1


def test_unsupported_shapes_are_refused_by_name():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"x \(65, 256\)"):
        skinny_matmul.matmul(_bf16(rng, (65, 256)), _bf16(rng, (256, 64)))
    with pytest.raises(ValueError, match="float32"):
        skinny_matmul.matmul(jnp.zeros((8, 256)), jnp.zeros((256, 64)))
    with pytest.raises(ValueError, match="splits=3"):
        skinny_matmul.matmul(_bf16(rng, (8, 256)), _bf16(rng, (256, 64)), splits=3)
    with pytest.raises(ValueError, match=r"expected \[D, 2, I\]"):
        skinny_matmul.decode_mlp(_bf16(rng, (8, 128)), _bf16(rng, (128, 192)), _bf16(rng, (192, 128)))
    assert not skinny_matmul.supported(8, 1536, 100, jnp.bfloat16)
    x, w = _bf16(rng, (8, 256)), _bf16(rng, (256, 64))
    with pytest.raises(ValueError, match=r"bias \(64,\) bfloat16 with splits=2"):
        skinny_matmul.matmul(x, w, _bf16(rng, (64,)), splits=2)
    with pytest.raises(ValueError, match=r"bias \(32,\)"):
        skinny_matmul.matmul(x, w, _bf16(rng, (32,)))


def test_implementation_switch(monkeypatch):
    assert skinny_matmul.IMPLEMENTATION == "auto"
    assert skinny_matmul.applies(16, 256, 64, jnp.bfloat16) == (jax.default_backend() == "gpu")
    assert not skinny_matmul.applies(8, 256, 64, jnp.bfloat16)  # batch 1..8: XLA's GEMMs
    monkeypatch.setattr(skinny_matmul, "IMPLEMENTATION", "pallas")
    assert skinny_matmul.applies(8, 256, 64, jnp.bfloat16)
    assert not skinny_matmul.applies(65, 256, 64, jnp.bfloat16)
    # decode_mlp's two GEMMs: an intermediate width of 192 suits gate|up (N) but not down_proj (K, blocks of 128)
    assert skinny_matmul.mlp_applies(16, 128, 256, jnp.bfloat16)
    assert skinny_matmul.applies(16, 128, 192, jnp.bfloat16)
    assert not skinny_matmul.mlp_applies(16, 128, 192, jnp.bfloat16)
    monkeypatch.setattr(skinny_matmul, "IMPLEMENTATION", "xla")
    assert not skinny_matmul.applies(8, 256, 64, jnp.bfloat16)


def test_decoder_steps_through_the_kernels_are_as_close_to_float32_as_xla(monkeypatch):
    """Decode steps of a bfloat16 Qwen2 decoder with q|k|v (+ bias), the MLP and o_proj (after the fused attention
    step) on the kernels: as close to the float32 decoder's hidden states as XLA's bfloat16 GEMMs are, step after step."""
    from flax import nnx

    from ghostvis_jax.config import QwenConfig
    from ghostvis_jax.model import qwen2
    from ghostvis_jax.model.attention import KeyRange

    cfg = QwenConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True)
    default_choice = qwen2.pick_implementation
    monkeypatch.setattr(qwen2, "pick_implementation",
                        lambda q, k, mask: "pallas" if isinstance(mask, KeyRange) else default_choice(q, k, mask))
    calls = []
    original = skinny_matmul._call
    monkeypatch.setattr(skinny_matmul, "_call", lambda *a, **kw: calls.append(kw["name"]) or original(*a, **kw))
    rows, prompt, cache_len, steps = 3, 5, 16, 3
    ids = jax.random.randint(jax.random.key(1), (rows, prompt + steps), 0, cfg.vocab_size)

    def decode_steps(dtype, implementation):
        monkeypatch.setattr(skinny_matmul, "IMPLEMENTATION", implementation)
        decoder = qwen2.Qwen2Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(0)), dtype=dtype)  # same weights
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((prompt, cache_len), bool)), (rows, 1, prompt, cache_len))
        _, cache = decoder(decoder.embed(ids[:, :prompt]), mask=mask, cache_index=0,
                           cache=qwen2.init_kv_cache(cfg, rows, cache_len, dtype))

        @jax.jit  # one compiled step: the interpreted kernels run as XLA ops, not op by op
        def step(graph_state, token, index, cache):
            model = nnx.merge(graph, graph_state)
            keys = KeyRange(start=jnp.zeros(rows, jnp.int32), end=jnp.full(rows, index + 1, jnp.int32))
            return model(model.embed(token), positions=jnp.full((rows, 1), index), mask=keys, cache=cache,
                         cache_index=index)

        graph, graph_state = nnx.split(decoder)
        out = []
        for index in range(prompt, prompt + steps):
            hidden, cache = step(graph_state, ids[:, index:index + 1], jnp.int32(index), cache)
            out.append(np.asarray(hidden, np.float32))
        return np.stack(out)

    reference = decode_steps(jnp.float32, "xla")
    xla = decode_steps(jnp.bfloat16, "xla")
    assert calls == []
    kernels = decode_steps(jnp.bfloat16, "pallas")
    assert sorted(set(calls)) == ["skinny_matmul", "skinny_matmul_bias", "skinny_swiglu_matmul"]
    xla_error, kernel_error = np.abs(xla - reference).max(), np.abs(kernels - reference).max()
    assert 0 < kernel_error <= 1.25 * xla_error, (kernel_error, xla_error)
