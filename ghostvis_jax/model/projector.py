"""MLP projector: Linear(D_v, hidden) → GELU (exact) → Dropout → Linear(hidden, D_llm) → LayerNorm(D_llm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ghostvis_jax.config import ProjectorConfig
from ghostvis_jax.model.layers import Dense, LayerNorm


class MLPProjector(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: ProjectorConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(in_dim, cfg.hidden_size, axes=("embed", "mlp"), **kw)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.fc2 = Dense(cfg.hidden_size, out_dim, axes=("mlp", "embed"), **kw)
        self.norm = LayerNorm(out_dim, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, dropout_rngs: nnx.Rngs | None = None) -> jax.Array:
        """Dropout is active only when `dropout_rngs` is given (training)."""
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        h = self.dropout(h, deterministic=dropout_rngs is None, rngs=dropout_rngs)
        return self.norm(self.fc2(h))
