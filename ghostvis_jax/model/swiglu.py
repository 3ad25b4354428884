"""SwiGLU, `silu(gate) * up` over the fused gate|up projection [..., 2, I], with a one-pass backward.

Why a custom backward: autodiff gives XLA the cotangent of the fused projection as one [..., 2, I] array whose
two halves are different functions of the same three inputs (gate, up and the output cotangent). XLA's loop
emitter computes each output element on its own, so every element of both halves re-reads gate, up and the
cotangent: about twice the bytes of one pass. On an H200 that kernel took 0.36 ms per layer of the full
fine-tune (28 launches, 10.2 ms of a 166 ms step; docs/LOG.md). The Pallas kernel below reads each input once
and writes both halves from the same program. Elsewhere (CPU, odd shapes) the same math runs as jnp.

The forward is XLA's own fusion (it reads the projection once already), so inference is unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ghostvis_jax.model.triton_call import whole_array_call
from ghostvis_jax.sharding import map_rows, rows_per_device

BLOCK_ROWS = 16
BLOCK_COLS = (256, 128)  # the first that divides the intermediate size
USE_KERNEL_ON_GPU = True  # tools/benchmark.py --swiglu-grad xla turns it off (the A/B measurement)


@jax.custom_vjp
def swiglu(gate_up: jax.Array) -> jax.Array:
    """gate_up [..., 2, I] (gate first, as Qwen2MLP's fused kernel) → silu(gate) * up [..., I], same dtype."""
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _forward(gate_up):
    return swiglu(gate_up), gate_up


def _backward(gate_up, d_out):
    return (swiglu_grad(gate_up, d_out),)


swiglu.defvjp(_forward, _backward)


def swiglu_grad_reference(gate_up: jax.Array, d_out: jax.Array) -> jax.Array:
    """d(silu(g) * u) / d[g, u] times d_out, in float32, as [..., 2, I] in gate_up's dtype."""
    g = gate_up[..., 0, :].astype(jnp.float32)
    u = gate_up[..., 1, :].astype(jnp.float32)
    d = d_out.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    d_up = d * g * sig
    return jnp.stack([d_gate, d_up], axis=-2).astype(gate_up.dtype)


def kernel_block_cols(gate_up_shape: tuple[int, ...]) -> int | None:
    """Column block of the Pallas kernel for this [..., 2, I] shape, or None where it does not apply."""
    rows, inner = math.prod(gate_up_shape[:-2]), gate_up_shape[-1]
    if gate_up_shape[-2] != 2 or rows % BLOCK_ROWS or rows * 2 * inner >= 2**31:  # offsets are int32
        return None
    return next((c for c in BLOCK_COLS if inner % c == 0), None)


def _grad_kernel(gate_up_ref, d_out_ref, grad_ref, *, block_cols: int, inner: int):
    """Refs are whole arrays: gate_up/grad [M, 2·I] (gate columns, then up columns), d_out [M, I]."""
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * BLOCK_ROWS, BLOCK_ROWS), BLOCK_ROWS)
    first = pl.multiple_of(pl.program_id(1) * block_cols, block_cols)
    gate_cols, up_cols = pl.ds(first, block_cols), pl.ds(inner + first, block_cols)
    g = gate_up_ref[rows, gate_cols].astype(jnp.float32)
    u = gate_up_ref[rows, up_cols].astype(jnp.float32)
    d = d_out_ref[rows, gate_cols].astype(jnp.float32)
    sig = 1.0 / (1.0 + jnp.exp(-g))
    grad_ref[rows, gate_cols] = (d * u * sig * (1.0 + g * (1.0 - sig))).astype(grad_ref.dtype)
    grad_ref[rows, up_cols] = (d * g * sig).astype(grad_ref.dtype)


def swiglu_grad_pallas(gate_up: jax.Array, d_out: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The reference's result from one Pallas (Triton) kernel; shapes must pass `kernel_block_cols`."""
    block_cols = kernel_block_cols(gate_up.shape)
    if block_cols is None or d_out.shape != gate_up.shape[:-2] + gate_up.shape[-1:]:
        raise ValueError(f"swiglu_grad_pallas: unsupported shapes gate_up {gate_up.shape}, d_out {d_out.shape}")
    inner = gate_up.shape[-1]
    rows = math.prod(gate_up.shape[:-2])
    (grad,) = whole_array_call(
        functools.partial(_grad_kernel, block_cols=block_cols, inner=inner),
        (rows // BLOCK_ROWS, inner // block_cols),
        [gate_up.reshape(rows, 2 * inner), d_out.reshape(rows, inner)],
        [jax.ShapeDtypeStruct((rows, 2 * inner), gate_up.dtype)],
        num_warps=4, interpret=interpret, name="swiglu_grad")
    return grad.reshape(gate_up.shape)


def swiglu_grad(gate_up: jax.Array, d_out: jax.Array, *, use_kernel: bool | None = None,
                interpret: bool = False) -> jax.Array:
    """The backward of `swiglu`: the Pallas kernel on a GPU where the shape allows, else the jnp reference.

    Under a mesh (FSDP) the kernel runs per device through shard_map: it is elementwise, so each device's rows
    are independent (a custom call left to GSPMD would be gathered onto every device). Tensor parallelism
    (a sharded intermediate dim) takes the reference path."""
    if use_kernel is None:
        use_kernel = USE_KERNEL_ON_GPU and jax.default_backend() == "gpu"
    local_rows = rows_per_device(gate_up.shape[0])
    if not use_kernel or local_rows is None or kernel_block_cols((local_rows,) + gate_up.shape[1:]) is None:
        return swiglu_grad_reference(gate_up, d_out)
    return map_rows(functools.partial(swiglu_grad_pallas, interpret=interpret), gate_up, d_out)
