"""Resamplers: [B, P, D_v] patch tokens → [B, N, D_v] image tokens.

Perceiver (the original's intent): N learned latents; each block `q += MHA(LN(q), ctx, ctx)` (the context
is not normalized, no latent self-attention) then `q += MLP(LN(q))` with a 4x exact-GELU MLP; no final norm.
AvgPool: adaptive average pooling of the square patch grid to a square grid of N tokens (no parameters).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghostvis_jax.config import ResamplerConfig
from ghostvis_jax.model.attention import attention
from ghostvis_jax.model.layers import Dense, LayerNorm, _normal, use


class CrossAttention(nnx.Module):
    """torch `nn.MultiheadAttention(batch_first=True)`: in_proj splits into q, k, v; out_proj."""

    def __init__(self, dim: int, num_heads: int, *, rngs, dtype, param_dtype):
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by its {num_heads} heads")
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(dim, dim, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = num_heads, dim // num_heads

    def __call__(self, q_in, ctx):
        b, n, d = q_in.shape
        p = ctx.shape[1]
        q = self.q_proj(q_in).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(ctx).reshape(b, p, self.num_heads, self.head_dim)
        v = self.v_proj(ctx).reshape(b, p, self.num_heads, self.head_dim)
        return self.out_proj(attention(q, k, v, causal=False).reshape(b, n, d))


class PerceiverBlock(nnx.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, eps=cfg.layer_norm_eps, **kw)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, eps=cfg.layer_norm_eps, **kw)
        hidden = dim * cfg.mlp_ratio
        self.fc1 = Dense(dim, hidden, use_bias=True, axes=("embed", "mlp"), rngs=rngs, **kw)
        self.fc2 = Dense(hidden, dim, use_bias=True, axes=("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, q, ctx):
        q = q + self.cross_attn(self.norm1(q), ctx)
        return q + self.fc2(jax.nn.gelu(self.fc1(self.norm2(q)), approximate=False))


class PerceiverResampler(nnx.Module):
    def __init__(self, dim: int, cfg: ResamplerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.latents = nnx.Param(_normal(rngs, (cfg.num_latents, dim), 0.02, param_dtype),
                                 logical_axes=(None, "embed"))
        self.blocks = nnx.List([PerceiverBlock(dim, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.dtype = dtype

    def __call__(self, ctx: jax.Array) -> jax.Array:
        ctx = ctx.astype(self.dtype)
        q = jnp.broadcast_to(use(self.latents, self.dtype), (ctx.shape[0],) + self.latents.shape)
        for block in self.blocks:
            q = block(q, ctx)
        return q


def adaptive_pool_matrix(in_side: int, out_side: int) -> np.ndarray:
    """[out_side², in_side²] averaging weights of torch's adaptive_avg_pool2d on square grids."""
    rows = np.zeros((out_side, in_side), np.float32)
    for i in range(out_side):
        start, end = (i * in_side) // out_side, -((-(i + 1) * in_side) // out_side)
        rows[i, start:end] = 1.0 / (end - start)
    return np.kron(rows, rows)


class AvgPoolResampler(nnx.Module):
    def __init__(self, num_patches: int, cfg: ResamplerConfig, *, dtype=jnp.float32):
        in_side, out_side = math.isqrt(num_patches), math.isqrt(cfg.num_latents)
        if in_side * in_side != num_patches or out_side * out_side != cfg.num_latents:
            raise ValueError(f"avgpool needs square grids: {num_patches} patches → {cfg.num_latents} tokens")
        self.in_side, self.out_side = in_side, out_side
        self.dtype = dtype

    def __call__(self, ctx: jax.Array) -> jax.Array:
        pool = jnp.asarray(adaptive_pool_matrix(self.in_side, self.out_side), ctx.dtype)
        return jnp.einsum("np,bpd->bnd", pool, ctx).astype(self.dtype)
