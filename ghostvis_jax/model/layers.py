"""Small NNX building blocks shared by the decoder, the tower and the adapters.

Every parameter carries `logical_axes` metadata; `ghostvis_jax.sharding` maps those names onto mesh axes.
Parameters are stored in `param_dtype` (float32 master weights by default) and cast to `dtype` for compute.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ghostvis_jax.sharding import gather_for_compute

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config / CLI names of the dtypes we run in


def use(param: nnx.Param, dtype=None) -> jax.Array:
    """A parameter's value where it is computed with: all-gathered over `fsdp` under a mesh (FSDP), cast."""
    x = gather_for_compute(param[...], getattr(param, "logical_axes", None))
    return x if dtype is None else x.astype(dtype)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, *out] (for one output dim: the transpose of torch's Linear.weight).

    Several output dims hold fused projections (q|k|v, gate|up) that one GEMM computes: the extra dims keep
    each part's own axis (and logical name), so sharding never splits across the parts."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], *, use_bias: bool, axes: tuple,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, std: float | None = None):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        if len(axes) != 1 + len(out):
            raise ValueError(f"Dense: {len(axes)} axis names for a kernel of shape {(in_features, *out)}")
        std = in_features ** -0.5 if std is None else std
        self.kernel = nnx.Param(_normal(rngs, (in_features, *out), std, param_dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros(out, param_dtype), logical_axes=tuple(axes[1:])) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = use(self.kernel, self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + use(self.bias, self.dtype)
        return y

    def decode_step(self, x: jax.Array) -> jax.Array:
        """self(x) for a decode step's few rows: `skinny_matmul`'s kernel where it applies (a GPU; the output dims
        flattened into one), else XLA."""
        from ghostvis_jax.model import skinny_matmul

        rows, (k, *out) = x.size // x.shape[-1], self.kernel.shape
        n = math.prod(out)
        if not skinny_matmul.applies(rows, k, n, self.dtype):
            return self(x)
        bias = None if self.bias is None else use(self.bias, self.dtype).reshape(n)
        y = skinny_matmul.matmul(x.reshape(rows, k).astype(self.dtype), use(self.kernel, self.dtype).reshape(k, n),
                                 bias)
        return y.reshape(*x.shape[:-1], *out)

    def fused(self, x: jax.Array, *, activation: str = "none") -> jax.Array:
        """activation(self(x)), with the bias and activation inside the GEMM where `fused_matmul`'s kernel runs
        (one output dim only). A residual goes through `siglip._with_residual`, which decides where it is added."""
        from ghostvis_jax.model.fused_matmul import fused_matmul

        bias = None if self.bias is None else use(self.bias, self.dtype)
        return fused_matmul(x.astype(self.dtype), use(self.kernel, self.dtype), bias, activation=activation)


class Embed(nnx.Module):
    """Token embedding table [vocab, dim] (also the LM head when tied: `Qwen2Decoder.head_weight`)."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), 0.02, param_dtype),
                                   logical_axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(use(self.embedding), ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalize in float32, cast back, then scale (HF's order of operations); with the residual add
    before it, one Pallas pass each way on a GPU for training-sized inputs (model/rms_norm.py)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        from ghostvis_jax.model.rms_norm import rms_norm

        return rms_norm(x, use(self.scale, self.dtype), eps=self.eps)

    def add_and_norm(self, x: jax.Array, update: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(x + update, self(x + update)), update optional."""
        from ghostvis_jax.model.rms_norm import add_rms_norm

        return add_rms_norm(x, update, use(self.scale, self.dtype), eps=self.eps)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm over the last dim: statistics and the affine map in float32, one rounding to `dtype`."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, use(self.scale, jnp.float32), use(self.bias, jnp.float32), self.eps, self.dtype)

    def add_and_norm(self, x: jax.Array, update: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(x + update, self(x + update)), update optional: one Pallas pass on a GPU (model/residual_norm.py)."""
        from ghostvis_jax.model.residual_norm import add_layer_norm

        return add_layer_norm(x, update, use(self.scale, jnp.float32), use(self.bias, jnp.float32), eps=self.eps,
                              dtype=self.dtype)
