"""Qwen2's residual add and RMSNorm, `x + update` and `RMSNorm(x + update)`, with the forward and the backward
each one Pallas (Triton) pass over the rows.

Why: XLA runs the training step's RMSNorm as a statistics pass, a normalize pass and a scale pass (autodiff keeps
the normalized x for the backward, so the last two stay apart), its backward as several more, and the residual
adds around it as passes of their own; with two norms per layer the norms were ~9 ms of a 234 ms train-sft step on
an H100 (docs/LOG.md, eleventh session) and the adds ~5 ms (fifteenth). Here a program holds a block of whole rows
in registers. The forward reads x and the update once and writes their sum (the residual stream), its norm and the
row's 1/rms (float32, kept for the backward). The backward reads the sum, the norm's cotangent and the sum's own
cotangent once and writes the gradient of the sum, which is that of x and of the update. The scale's gradient
(column sums) comes as per-block partial sums from the same pass, only where the scale is trained (a frozen
layer's is not differentiated: `jax.custom_vjp`'s symbolic zeros say which). Measured on an H100: train-sft's step
−1.8%, train-full's −0.5%; the same kernels without the adds gained nothing, because XLA had fused the adds into
its own norm passes (docs/LOG.md, fifteenth session).

Numerics: the forward is HF's (normalize in float32, round, multiply by the scale, round); the backward is the
exact gradient in float32, rounded once (autodiff rounds the scaled cotangent to bf16 first). Rows must be a
multiple of BLOCK_ROWS and at least MIN_ROWS (a decode step's few rows stay with XLA, whose fusion launches as
fast); the width is read as power-of-2 column chunks (1536 = 1024 + 512). Off a GPU, in float32, under tensor
parallelism and for shapes the kernels do not take, the jnp reference runs; under FSDP the kernels run per device
through shard_map.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ghostvis_jax.model.triton_call import column_chunks, whole_array_call
from ghostvis_jax.sharding import map_rows, rows_per_device

USE_KERNEL_ON_GPU = True  # tools/benchmark.py --rms-norm xla turns it off (the A/B measurement)
BLOCK_ROWS = 8
MIN_ROWS = 1024
NUM_WARPS = 4


def reference(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
    """HF Qwen2RMSNorm: x in float32 times 1/rms, rounded to the scale's dtype, times the scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(scale.dtype)


def kernel_supported(rows: int, width: int, dtype) -> bool:
    return (rows >= MIN_ROWS and rows % BLOCK_ROWS == 0 and rows * width < 2**31
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and column_chunks(width) is not None)


def _rows():
    return pl.ds(pl.multiple_of(pl.program_id(0) * BLOCK_ROWS, BLOCK_ROWS), BLOCK_ROWS)


def _forward_kernel(*refs, chunks, width: int, eps: float, has_update: bool):
    """Whole-array refs: x [M, D], (update [M, D],) scale [D] → (sum [M, D],) y [M, D], rstd [M] float32."""
    if has_update:
        x_ref, update_ref, scale_ref, sum_ref, y_ref, rstd_ref = refs
    else:
        x_ref, scale_ref, y_ref, rstd_ref = refs
    rows = _rows()
    parts = []
    for start, size in chunks:
        v = x_ref[rows, pl.ds(start, size)]
        if has_update:  # rounded to the residual stream's dtype, as XLA rounds `x + update`
            v = (v.astype(jnp.float32) + update_ref[rows, pl.ds(start, size)].astype(jnp.float32)).astype(v.dtype)
            sum_ref[rows, pl.ds(start, size)] = v
        parts.append(v.astype(jnp.float32))
    rstd = jax.lax.rsqrt(sum(jnp.sum(p * p, axis=1) for p in parts) / width + eps)
    for (start, size), p in zip(chunks, parts):
        normed = (p * rstd[:, None]).astype(y_ref.dtype).astype(jnp.float32)
        scale = scale_ref[pl.ds(start, size)].astype(jnp.float32)
        y_ref[rows, pl.ds(start, size)] = (scale[None, :] * normed).astype(y_ref.dtype)
    rstd_ref[rows] = rstd


def _backward_kernel(*refs, chunks, width: int, has_sum_grad: bool, scale_grad: bool):
    """d_sum = rstd · (g − x̂ · mean(g · x̂)) (+ the sum's own cotangent) with x̂ = x · rstd and g = dy · scale,
    float32; with scale_grad also this block's share of the scale's gradient, the column sums of dy · round(x̂)."""
    x_ref, dy_ref, *refs = refs
    ds_ref = refs.pop(0) if has_sum_grad else None
    scale_ref, rstd_ref, dx_ref, *refs = refs
    partial_ref = refs[0] if scale_grad else None
    rows = _rows()
    rstd = rstd_ref[rows]
    normed = [x_ref[rows, pl.ds(s, n)].astype(jnp.float32) * rstd[:, None] for s, n in chunks]
    d_out = [dy_ref[rows, pl.ds(s, n)].astype(jnp.float32) for s, n in chunks]
    grads = [d * scale_ref[pl.ds(s, n)].astype(jnp.float32)[None, :] for d, (s, n) in zip(d_out, chunks)]
    mean = sum(jnp.sum(g * xn, axis=1) for g, xn in zip(grads, normed)) / width
    for (start, size), g, xn, d in zip(chunks, grads, normed, d_out):
        dx = rstd[:, None] * (g - xn * mean[:, None])
        if has_sum_grad:
            dx += ds_ref[rows, pl.ds(start, size)].astype(jnp.float32)
        dx_ref[rows, pl.ds(start, size)] = dx.astype(dx_ref.dtype)
        if scale_grad:
            rounded = xn.astype(scale_ref.dtype).astype(jnp.float32)
            partial_ref[pl.ds(pl.program_id(0), 1), pl.ds(start, size)] = jnp.sum(d * rounded, axis=0)[None, :]


def _call(kernel, inputs, out_shapes, *, interpret: bool, name: str):
    return whole_array_call(kernel, (inputs[0].shape[0] // BLOCK_ROWS,), inputs, out_shapes, num_warps=NUM_WARPS,
                            interpret=interpret, name=name)


def _check(x, scale, *others):
    rows, width = (x.shape if x.ndim == 2 else (0, x.shape[-1]))  # not 2-d: refused below, by its shape
    if (not kernel_supported(rows, width, x.dtype) or scale.shape != (width,)
            or any(o is not None and o.shape != x.shape for o in others)):
        raise ValueError(f"rms_norm: unsupported shapes x {x.shape} {x.dtype}, scale {scale.shape}, others "
                         f"{[None if o is None else o.shape for o in others]} (2-d, at least {MIN_ROWS} rows in "
                         f"blocks of {BLOCK_ROWS}, half precision, power-of-2 column chunks, others shaped as x)")
    return rows, width


def forward_pallas(x, update, scale, *, eps: float, interpret: bool = False):
    """x, update (or None) [M, D] → (x + update, the reference's norm of it, 1/rms [M] float32): one Pallas pass."""
    rows, width = _check(x, scale, update)
    has_update = update is not None
    kernel = functools.partial(_forward_kernel, chunks=column_chunks(width), width=width, eps=eps,
                               has_update=has_update)
    out_shapes = [jax.ShapeDtypeStruct(x.shape, scale.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)]
    inputs = [x, update.astype(x.dtype), scale] if has_update else [x, scale]
    sum_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] if has_update else []
    outs = _call(kernel, inputs, sum_shape + out_shapes, interpret=interpret,
                 name="add_rms_norm" if has_update else "rms_norm")
    return tuple(outs) if has_update else (x, *outs)


def backward_pallas(total, dy, d_total, scale, rstd, *, scale_grad: bool = False, interpret: bool = False):
    """The gradient of the sum x + update ([M, D], both of theirs) from the norm's cotangent dy and the sum's own
    d_total (or None), and with scale_grad the scale's gradient as float32 partial sums [M / BLOCK_ROWS, D]."""
    rows, width = _check(total, scale, dy, d_total)
    has_sum_grad = d_total is not None
    kernel = functools.partial(_backward_kernel, chunks=column_chunks(width), width=width,
                               has_sum_grad=has_sum_grad, scale_grad=scale_grad)
    inputs = [total, dy.astype(scale.dtype)] + ([d_total.astype(total.dtype)] if has_sum_grad else []) + [scale, rstd]
    out_shapes = [jax.ShapeDtypeStruct(total.shape, total.dtype)] + (
        [jax.ShapeDtypeStruct((rows // BLOCK_ROWS, width), jnp.float32)] if scale_grad else [])
    outs = _call(kernel, inputs, out_shapes, interpret=interpret, name="rms_norm_grad")
    return tuple(outs) if scale_grad else outs[0]


def _rows_2d(a):
    """[B, ..., D] → [rows, D] (under FSDP still split by rows: the batch dim leads)."""
    return None if a is None else a.reshape(-1, a.shape[-1])


def _forward(x, update, scale, eps, interpret):
    """The forward kernel on each device's rows (`map_rows`): (sum, norm, 1/rms), flattened to rows."""
    if update is None:
        return map_rows(lambda a: forward_pallas(a, None, scale, eps=eps, interpret=interpret), _rows_2d(x))
    return map_rows(lambda a, u: forward_pallas(a, u, scale, eps=eps, interpret=interpret), _rows_2d(x),
                    _rows_2d(update))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_path(x, update, scale, eps, interpret):
    total, y, _ = _forward(x, update, scale, eps, interpret)
    return total.reshape(x.shape), y.reshape(x.shape)


def _kernel_path_fwd(x, update, scale, eps, interpret):
    """With symbolic zeros: `scale.perturbed` says whether the scale is trained (a frozen layer's is not). The
    residuals mark "has an update" and "train the scale" by an empty array or None."""
    marker = jnp.zeros((0,))
    update_value = None if update is None else update.value
    total, y, rstd = _forward(x.value, update_value, scale.value, eps, interpret)
    shape = x.value.shape
    return (total.reshape(shape), y.reshape(shape)), (total, scale.value, rstd, None if update is None else marker,
                                                      marker if scale.perturbed else None)


def _kernel_path_bwd(eps, interpret, saved, cotangents):
    total, scale, rstd, has_update, scale_grad = saved
    d_total, dy = (None if isinstance(c, jax.custom_derivatives.SymbolicZero) else c for c in cotangents)
    if dy is None:
        return d_total, None if has_update is None else d_total, None
    grad = functools.partial(backward_pallas, scale=scale, scale_grad=scale_grad is not None, interpret=interpret)
    if d_total is None:
        out = map_rows(lambda t, d, r: grad(t, d, None, rstd=r), total, _rows_2d(dy), rstd)
    else:
        out = map_rows(lambda t, d, s, r: grad(t, d, s, rstd=r), total, _rows_2d(dy), _rows_2d(d_total), rstd)
    dx, d_scale = out if scale_grad is not None else (out, None)
    dx = dx.reshape(dy.shape)
    if d_scale is not None:  # per-block partial sums from every device: their sum is the (all-reduced) gradient
        d_scale = jnp.sum(d_scale, axis=0).astype(scale.dtype)
    return dx, None if has_update is None else dx, d_scale


_kernel_path.defvjp(_kernel_path_fwd, _kernel_path_bwd, symbolic_zeros=True)


def uses_kernel(x: jax.Array, scale: jax.Array) -> bool:
    """Whether the kernels take x [B, ..., D] here: bf16/f16, enough rows per device, FSDP or no mesh."""
    local_rows = rows_per_device(x.shape[0]) if x.ndim >= 2 else None
    return (local_rows is not None and x.dtype == scale.dtype
            and kernel_supported(local_rows * math.prod(x.shape[1:-1]), x.shape[-1], x.dtype))


def add_rms_norm(x: jax.Array, update: jax.Array | None, scale: jax.Array, *, eps: float,
                 use_kernel: bool | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x + update, RMSNorm(x + update)) over the last dim of x [B, ..., D] (update None: x and RMSNorm(x)), scale
    [D] in the compute dtype: the Pallas kernels on a GPU where `uses_kernel` accepts the shapes (`use_kernel`
    True: off a GPU too, the CPU tests, interpreted), else the reference."""
    if update is not None and update.shape != x.shape:
        raise ValueError(f"add_rms_norm: update {update.shape} does not match x {x.shape}")
    if use_kernel is None:
        use_kernel = USE_KERNEL_ON_GPU and jax.default_backend() == "gpu"
    if not (use_kernel and uses_kernel(x, scale)):
        total = x if update is None else x + update.astype(x.dtype)
        return total, reference(total, scale, eps=eps)
    return _kernel_path(x, update, scale, eps, interpret)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, use_kernel: bool | None = None,
             interpret: bool = False) -> jax.Array:
    """RMSNorm(x): `add_rms_norm` without an update."""
    return add_rms_norm(x, None, scale, eps=eps, use_kernel=use_kernel, interpret=interpret)[1]
