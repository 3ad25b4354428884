"""The fused-epilogue matmul: the Mosaic GPU kernel (CPU interpreter, and compiled on a Hopper GPU) against the
float32 reference, its custom VJP against autodiff of the reference, and the XLA fallback against the tower's
plain expression."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.model import fused_matmul as fm

SMALL = fm.Tiling(block_m=64, block_n=64, block_k=64, stages=2, epilogue_m=32, epilogue_n=64, snake_width=2)
# Four epilogue sub-tiles per warpgroup: the last two reuse staging slots (and load their residual) in the epilogue.
SMALL_SUBTILES = fm.Tiling(block_m=64, block_n=64, block_k=64, stages=2, epilogue_m=32, epilogue_n=32)
EPILOGUES = [dict(), dict(bias=True, activation="gelu_tanh"), dict(bias=True, residual=True), dict(residual=True)]


def _interpret_params():
    try:  # where newer jax exports it
        from jax.experimental.pallas.mosaic_gpu import InterpretParams
    except ImportError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as InterpretParams
    return InterpretParams()


def _inputs(m, k, n, *, bias=False, residual=False, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(scale=k ** -0.5, size=(k, n)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.bfloat16) if bias else None
    r = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16) if residual else None
    return x, w, b, r


def _close_to_reference(got, x, w, b, r, activation):
    want = fm.reference(x.astype(jnp.float32), w.astype(jnp.float32), b, r, activation)
    # One bf16 rounding of a float32 result: within half an ulp, plus float32 summation-order noise.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("tiling", [SMALL, SMALL_SUBTILES], ids=["2-subtiles", "4-subtiles"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(f"{k}" for k in e) or "plain")
def test_kernel_in_the_interpreter_matches_the_reference(epilogue, tiling):
    activation = epilogue.get("activation", "none")
    # 2 x 2 CTA tiles of 64 x 128, 2 k steps: the persistent loop, the pipeline and every epilogue slot run.
    x, w, b, r = _inputs(128, 128, 256, bias="bias" in epilogue, residual="residual" in epilogue)
    got = fm.fused_matmul_pallas(x, w, b, r, activation=activation, tiling=tiling, interpret=_interpret_params())
    assert got.shape == (128, 256) and got.dtype == jnp.bfloat16
    _close_to_reference(got, x, w, b, r, activation)


def test_custom_vjp_differentiates_the_reference(monkeypatch):
    monkeypatch.setattr(fm, "fused_matmul_pallas", functools.partial(fm.fused_matmul_pallas, tiling=SMALL,
                                                                     interpret=_interpret_params()))
    x, w, b, r = _inputs(64, 64, 128, bias=True, residual=True, seed=1)
    d_out = jnp.asarray(np.random.default_rng(2).normal(size=(64, 128)), jnp.bfloat16)
    got = jax.vjp(lambda *a: fm._fused(*a, "gelu_tanh"), x, w, b, r)[1](d_out)
    want = jax.vjp(functools.partial(fm.reference, activation="gelu_tanh"), x, w, b, r)[1](d_out)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


def test_fallback_is_the_plain_xla_expression():
    x, w, b, r = _inputs(6, 32, 48, bias=True, residual=True, seed=3)
    got = fm.fused_matmul(x.reshape(2, 3, 32), w, b, r.reshape(2, 3, 48), activation="gelu_tanh")
    want = r + jax.nn.gelu(jnp.dot(x, w) + b, approximate=True)
    np.testing.assert_array_equal(got.reshape(6, 48), want)


def test_unknown_activation_and_bad_shapes_are_refused():
    x, w, _, _ = _inputs(64, 64, 128)
    with pytest.raises(ValueError, match="activation must be one of"):
        fm.fused_matmul(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"unsupported shapes x \(64, 64\), w \(64, 128\), bias \(3,\)"):
        fm.fused_matmul_pallas(x, w, jnp.zeros((3,), jnp.bfloat16), tiling=SMALL)


def _on_hopper() -> bool:
    return jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


@pytest.mark.skipif(not _on_hopper(), reason="the compiled kernel needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("shape", [(512, 384, 768), (200, 128, 256)], ids=["tiled", "ragged-rows"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(f"{k}" for k in e) or "plain")
def test_compiled_kernel_matches_the_reference(epilogue, shape):
    activation = epilogue.get("activation", "none")
    # ragged rows: the last row tile reaches past row 200 (TMA zero-fills those loads and drops those stores).
    x, w, b, r = _inputs(*shape, bias="bias" in epilogue, residual="residual" in epilogue, seed=4)
    assert fm.kernel_supported(*shape, jnp.bfloat16)
    got = jax.jit(functools.partial(fm.fused_matmul, activation=activation))(x, w, b, r)
    _close_to_reference(got, x, w, b, r, activation)


@pytest.mark.skipif(not _on_hopper(), reason="the compiled kernel needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("vision", ["siglip-large-patch16-256", "siglip-so400m-patch14-384"])
def test_tower_with_the_kernel_matches_the_xla_tower(monkeypatch, vision):
    import dataclasses

    from flax import nnx

    from ghostvis_jax.config import preset
    from ghostvis_jax.model.siglip import SiglipVisionTower

    cfg = dataclasses.replace(preset(vision=vision).vision, num_layers=2)
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(tower)
    # large256: 2 images, 512 rows; So400m: 8 images, 5832 rows (ragged), MLP width 4304 padded to 4352.
    images = 2 if cfg.num_patches % 128 == 0 else 8
    pixels = jnp.asarray(np.random.default_rng(5).normal(size=(images, cfg.image_size, cfg.image_size, 3)),
                         jnp.bfloat16)

    def run():
        hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, pixels).as_text()
        return hlo, jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, pixels)

    hlo_kernel, with_kernel = run()
    monkeypatch.setattr(fm, "USE_KERNEL_ON_GPU", False)
    hlo_xla, with_xla = run()
    assert "mosaic_gpu" in hlo_kernel and "mosaic_gpu" not in hlo_xla
    # bf16 activations through two layers: the kernel rounds once where XLA rounds after the GEMM and again
    # after each epilogue op, so the two agree to bf16 noise, not bit for bit.
    diff = np.abs(np.asarray(with_kernel, np.float32) - np.asarray(with_xla, np.float32))
    assert float(diff.mean()) < 2e-2 and float(diff.max()) < 0.25
