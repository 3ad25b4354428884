"""The SigLIP vision tower as in HF `SiglipVisionModel`, returning patch tokens (no pooling head).

Input: channels-last normalized pixels [B, H, W, 3]. Output: [B, num_patches, hidden].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ghostvis_jax.config import SiglipConfig
from ghostvis_jax.model import fused_matmul
from ghostvis_jax.model.attention import attention
from ghostvis_jax.model.layers import Dense, LayerNorm, _normal, use


class SiglipAttention(nnx.Module):
    """Separate q, k, v projections: a fused [D, 3, N, H] one measured no faster on an H100 (its q/k/v slices
    must be copied into cuDNN's layout) and 4% slower for So400m/384 (docs/LOG.md)."""

    def __init__(self, cfg: SiglipConfig, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.attn_impl: str | None = None

    def __call__(self, x, residual):
        """→ (residual + out_proj(attention(x)), None), or (residual, out_proj(...)) where the add is left to the
        next LayerNorm (`_with_residual`)."""
        b, p, d = x.shape
        split = lambda y: y.reshape(b, p, self.num_heads, self.head_dim)
        # k and v read x through a barrier, so no two projections share an operand: XLA's GPU dot merger would
        # otherwise fuse q and k into one GEMM over weights concatenated on every call, with a transposed
        # output and separate bias passes (4.7% slower for the large256 tower on an H200, docs/LOG.md).
        xk, xv = jax.lax.optimization_barrier((x, x))
        out = attention(split(self.q_proj.fused(x)), split(self.k_proj.fused(xk)), split(self.v_proj.fused(xv)),
                        causal=False, implementation=self.attn_impl)
        dense = self.out_proj
        return _with_residual(out.reshape(b, p, d), use(dense.kernel, dense.dtype), use(dense.bias, dense.dtype),
                              residual)


def _with_residual(h, w, bias, residual):
    """An output projection and its residual: (residual + h @ w + bias, None) when the fused matmul adds the
    residual in its epilogue, else (residual, h @ w + bias), leaving the add to the next LayerNorm's pass
    (`LayerNorm.add_and_norm`): XLA would run it as a pass of its own (So400m's width 1152, docs/LOG.md)."""
    m, (k, n) = math.prod(h.shape[:-1]), w.shape
    if fused_matmul.uses_kernel(m, k, n, w.dtype, residual=True):
        return fused_matmul.fused_matmul(h.astype(w.dtype), w, bias, residual), None
    return residual, fused_matmul.fused_matmul(h.astype(w.dtype), w, bias)


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x, residual):
        """→ (residual + mlp(x), None), or (residual, mlp(x)) where the add is left to the next LayerNorm."""
        width, dtype = self.fc1.kernel.shape[1], self.fc1.dtype
        pad = fused_matmul.padded_width(width) - width
        w2 = use(self.fc2.kernel, dtype)
        if pad and fused_matmul.uses_kernel(math.prod(x.shape[:-1]), x.shape[-1], width + pad, dtype):
            # So400m's width 4304 is no whole number of kernel tiles: zero columns of fc1 (GELU(0) = 0) meet
            # zero rows of fc2, so the result is unchanged and fc1 with its GELU runs in the fused kernel.
            w1 = jnp.pad(use(self.fc1.kernel, dtype), ((0, 0), (0, pad)))
            b1 = jnp.pad(use(self.fc1.bias, dtype), (0, pad))
            w2 = jnp.pad(w2, ((0, pad), (0, 0)))
            h = fused_matmul.fused_matmul(x.astype(dtype), w1, b1, activation="gelu_tanh")
        else:
            h = self.fc1.fused(x, activation="gelu_tanh")
        return _with_residual(h, w2, use(self.fc2.bias, dtype), residual)


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(cfg, rngs=rngs, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, update=None):
        """The layer's input is x + update, and so is its output: `update` is a projection whose residual add
        the fused matmul could not take, added in the next LayerNorm's pass (model/residual_norm.py)."""
        x, h = self.layer_norm1.add_and_norm(x, update)
        x, update = self.self_attn(h, residual=x)
        x, h = self.layer_norm2.add_and_norm(x, update)
        return self.mlp(h, residual=x)


class SiglipVisionTower(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        # Conv2d(c, d, kernel=stride=p) as a [p, p, c, d] kernel applied to non-overlapping patches.
        self.patch_kernel = nnx.Param(_normal(rngs, (p, p, c, d), (p * p * c) ** -0.5, param_dtype),
                                      logical_axes=(None, None, None, "embed"))
        self.patch_bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.position_embedding = nnx.Param(_normal(rngs, (cfg.num_patches, d), 0.02, param_dtype),
                                            logical_axes=(None, "embed"))
        self.layers = nnx.List([SiglipEncoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.dtype = dtype

    def patchify(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] → [B, (H/p)·(W/p), p·p·C] in (row, col, channel) order, patches row-major."""
        b, h, w, c = pixel_values.shape
        p = self.config.patch_size
        if h != self.config.image_size or w != self.config.image_size or c != self.config.num_channels:
            raise ValueError(f"pixel_values shape {pixel_values.shape} does not match the tower "
                             f"({self.config.image_size}x{self.config.image_size}x{self.config.num_channels})")
        gh, gw = h // p, w // p
        # A stride-p convolution ignores the remainder pixels (384 = 27·14 + 6 for So400m/14).
        x = pixel_values[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * gw, p * p * c)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patchify(pixel_values).astype(self.dtype)
        kernel = use(self.patch_kernel).reshape(-1, self.config.hidden_size).astype(self.dtype)
        x = jnp.dot(patches, kernel) + use(self.patch_bias, self.dtype)
        x = x + use(self.position_embedding, self.dtype)
        update = None
        for layer in self.layers:
            x, update = layer(x, update)
        return self.post_layernorm.add_and_norm(x, update)[1]
