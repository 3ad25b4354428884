"""The SigLIP tower's compiled program on a GPU: each projection is its own GEMM (see SiglipAttention)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ghostvis_jax.config import preset
from ghostvis_jax.model.siglip import SiglipVisionTower


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's dot merger is a GPU pass")
def test_no_projection_weights_are_concatenated_at_run_time():
    cfg = dataclasses.replace(preset(vision="siglip-base-patch16-224").vision, num_layers=1)
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(tower)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    hlo = forward.lower(state, jnp.zeros((2, 224, 224, 3), jnp.bfloat16)).compile().as_text()
    assert "concatenate(" not in hlo
