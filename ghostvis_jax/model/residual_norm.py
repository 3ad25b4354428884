"""`x + update` and `LayerNorm(x + update)` in one pass over the rows, as a Pallas (Triton) kernel, for the frozen
SigLIP tower.

Why: in the So400m/14 tower (width 1152) the output projections run as cuBLAS GEMMs, so the residual adds are XLA
passes of their own, and XLA's LayerNorm fusions over 1152-wide rows ran at 1.8-2.4 TB/s: 14.1 ms of a 94.6 ms
step on an H100 (docs/LOG.md, twelfth session). Here each program reads a block of whole rows of x and the update
once, writes their sum (the residual stream, rounded as XLA rounds `x + update`) and its LayerNorm (statistics in
float32, two passes over the registers, one rounding), so a layer pays two passes where it paid three.

Rows must be a multiple of BLOCK_ROWS; the width is read as power-of-2 column chunks (Triton's block shapes),
1152 = 1024 + 128. Forward only: a custom VJP differentiates the jnp reference, so a tower someone unfreezes
still trains. Off a GPU, under a mesh and for shapes the kernel does not take, the jnp reference runs instead
(`layers.layer_norm`, the math of `layers.LayerNorm`). Measured on an H100: the So400m step 4.3% shorter; large256
(whose adds are in its GEMM epilogues, so only plain LayerNorms come here) unchanged (docs/LOG.md, thirteenth
session).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ghostvis_jax.model.layers import layer_norm
from ghostvis_jax.model.triton_call import MAX_CHUNKS, MIN_CHUNK, column_chunks, whole_array_call

USE_KERNEL_ON_GPU = True  # tools/benchmark.py --vision-norm xla turns it off (the A/B measurement)
BLOCK_ROWS = 8  # rows per program; 4, 8 or 16 rows with 4 or 8 warps were within 1% in the So400m tower
NUM_WARPS = 4


def reference(x, update, scale, bias, *, eps: float, dtype):
    """(x + update, LayerNorm(x + update)) in jnp; the sum in x's dtype (the residual stream), the norm in `dtype`."""
    total = x if update is None else x + update.astype(x.dtype)
    return total, layer_norm(total, scale, bias, eps, dtype)


def kernel_supported(rows: int, width: int, dtype) -> bool:
    return (rows > 0 and rows % BLOCK_ROWS == 0 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and column_chunks(width) is not None)


def uses_kernel(rows: int, width: int, dtype) -> bool:
    """Whether `add_layer_norm` takes the kernel here (GPU, no mesh, shapes)."""
    return (USE_KERNEL_ON_GPU and jax.default_backend() == "gpu" and jax.sharding.get_abstract_mesh().empty
            and kernel_supported(rows, width, dtype))


def _kernel(*refs, chunks, width: int, eps: float, has_update: bool):
    """Refs are whole arrays: x [M, D] (and update [M, D]), scale and bias [D] float32, then the outputs: the sum
    [M, D] (with an update) and the norm [M, D]."""
    if has_update:
        x_ref, update_ref, scale_ref, bias_ref, sum_ref, norm_ref = refs
    else:
        (x_ref, scale_ref, bias_ref, norm_ref), update_ref, sum_ref = refs, None, None
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * BLOCK_ROWS, BLOCK_ROWS), BLOCK_ROWS)
    parts = []
    for start, size in chunks:
        cols = pl.ds(start, size)
        v = x_ref[rows, cols]
        if has_update:
            v = (v.astype(jnp.float32) + update_ref[rows, cols].astype(jnp.float32)).astype(sum_ref.dtype)
            sum_ref[rows, cols] = v
        parts.append(v.astype(jnp.float32))
    mean = sum(jnp.sum(p, axis=1) for p in parts)[:, None] / width
    var = sum(jnp.sum(jnp.square(p - mean), axis=1) for p in parts)[:, None] / width
    rstd = jax.lax.rsqrt(var + eps)
    for (start, size), p in zip(chunks, parts):
        cols = pl.ds(start, size)
        y = (p - mean) * rstd * scale_ref[cols][None, :] + bias_ref[cols][None, :]
        norm_ref[rows, cols] = y.astype(norm_ref.dtype)


def add_layer_norm_pallas(x, update, scale, bias, *, eps: float, dtype, interpret: bool = False):
    """The reference's result from one Pallas (Triton) kernel over x [M, D]; shapes must pass `kernel_supported`."""
    rows, width = (x.shape if x.ndim == 2 else (0, x.shape[-1]))  # not 2-d: refused below, by its shape
    if (not kernel_supported(rows, width, x.dtype) or scale.shape != (width,)
            or bias.shape != (width,) or (update is not None and update.shape != x.shape)):
        raise ValueError(f"add_layer_norm: unsupported shapes x {x.shape} {x.dtype}, update "
                         f"{None if update is None else update.shape}, scale {scale.shape}, bias {bias.shape} "
                         f"(rows a multiple of {BLOCK_ROWS}, half precision, at most {MAX_CHUNKS} power-of-2 "
                         f"column chunks of at least {MIN_CHUNK})")
    has_update = update is not None
    inputs = [x] + ([update.astype(x.dtype)] if has_update else []) + [scale.astype(jnp.float32),
                                                                       bias.astype(jnp.float32)]
    out_shapes = ([jax.ShapeDtypeStruct(x.shape, x.dtype)] if has_update else []) + [
        jax.ShapeDtypeStruct(x.shape, dtype)]
    outs = whole_array_call(
        functools.partial(_kernel, chunks=column_chunks(width), width=width, eps=eps, has_update=has_update),
        (rows // BLOCK_ROWS,), inputs, out_shapes, num_warps=NUM_WARPS, interpret=interpret,
        name="add_layer_norm" if has_update else "layer_norm")
    return (outs[0], outs[1]) if has_update else (x, outs[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kernel_path(x, update, scale, bias, eps, dtype, interpret):
    return add_layer_norm_pallas(x, update, scale, bias, eps=eps, dtype=dtype, interpret=interpret)


def _kernel_path_fwd(x, update, scale, bias, eps, dtype, interpret):
    return _kernel_path(x, update, scale, bias, eps, dtype, interpret), (x, update, scale, bias)


def _kernel_path_bwd(eps, dtype, interpret, saved, cotangents):
    _, pullback = jax.vjp(functools.partial(reference, eps=eps, dtype=dtype), *saved)
    return pullback(cotangents)


_kernel_path.defvjp(_kernel_path_fwd, _kernel_path_bwd)


def add_layer_norm(x, update, scale, bias, *, eps: float, dtype, use_kernel: bool | None = None,
                   interpret: bool = False):
    """(x + update, LayerNorm(x + update)) over the last dim of x [..., D]; `update` may be None (then x and
    LayerNorm(x)). The Pallas kernel where `uses_kernel` accepts the shape (or `use_kernel` forces it: the CPU
    tests, interpreted), the jnp reference elsewhere."""
    if update is not None and update.shape != x.shape:
        raise ValueError(f"add_layer_norm: update {update.shape} does not match x {x.shape}")
    lead, width = x.shape[:-1], x.shape[-1]
    rows = x.size // width
    if not (uses_kernel(rows, width, x.dtype) if use_kernel is None else use_kernel):
        return reference(x, update, scale, bias, eps=eps, dtype=dtype)
    flat = None if update is None else update.reshape(rows, width)
    total, normed = _kernel_path(x.reshape(rows, width), flat, scale, bias, eps, jnp.dtype(dtype), interpret)
    return total.reshape(x.shape), normed.reshape(*lead, width)
