"""log-sum-exp over each row of the loss's logits in one read, as a Pallas (Triton) kernel.

Why: `jax.nn.logsumexp` over the [tokens, 151,936] logits is two XLA reductions, each a full read of them: the
row max, then the sum of exp(x - max) (1.6 + 2.1 ms of a 231 ms train-sft step on an H100, where the bf16 logits
are 5 GB; docs/LOG.md, fourteenth session). Here each program keeps a running max and a running sum that it
rescales whenever the max grows (the online softmax), so the logits are read once.

Pallas' Triton offsets are int32, and train-sft's 16,384 x 151,936 logits are more elements than that (2.5e9).
bf16 logits are therefore read as uint32 pairs ([M, V/2], a bitcast, no copy): a bf16 is the top half of the
float32 of the same value, so each word gives two float32s by a shift and a mask, and a log-sum-exp does not care
which column a value came from. A program takes BLOCK_ROWS rows and walks them in BLOCK_COLS-wide column blocks (of
words), then the rest of the row as power-of-2 chunks (75,968 = 37 x 2048 + 128 + 64), so no load is masked.
Float32 math. Off a GPU, under tensor parallelism and for shapes the kernel does not take, `jax.nn.logsumexp`
runs; under FSDP the kernel runs per device through shard_map (each row is independent).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ghostvis_jax.model.triton_call import MIN_CHUNK, power_of_2_chunks, whole_array_call
from ghostvis_jax.sharding import map_rows, rows_per_device

USE_KERNEL_ON_GPU = True  # tools/benchmark.py --loss-lse xla turns it off (the A/B measurement)
BLOCK_ROWS = 1
BLOCK_COLS = 2048  # words: 4096 bf16 logits (an H100 sweep: 854 us at [8192, 151936] vs XLA's 1756)
NUM_WARPS = 4


def reference(logits: jax.Array) -> jax.Array:
    """logits [..., V] → float32 [...]."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def column_blocks(width: int, block_cols: int) -> tuple[int, tuple[tuple[int, int], ...]] | None:
    """(full BLOCK_COLS blocks, the (start, size) power-of-2 chunks of the rest), or None when the rest needs a
    chunk under MIN_CHUNK columns."""
    full = width // block_cols
    rest = power_of_2_chunks(width % block_cols, start=full * block_cols)
    return None if rest is None else (full, rest)


def _words(width: int, dtype) -> int | None:
    """Columns of the kernel's view of a row: bf16 pairs as uint32 words, float32 as they are; None: no kernel."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return width // 2 if width % 2 == 0 else None
    return width if jnp.dtype(dtype) == jnp.float32 else None


def kernel_supported(rows: int, width: int, dtype, block_rows: int | None = None,
                     block_cols: int | None = None) -> bool:
    block_rows, block_cols = block_rows or BLOCK_ROWS, block_cols or BLOCK_COLS
    words = _words(width, dtype)
    return (rows > 0 and rows % block_rows == 0 and words is not None and rows * words < 2**31  # int32 offsets
            and column_blocks(words, block_cols) is not None)


def _as_float32(x):
    """A block of the kernel's view → the float32 values in it: a float32 block as it is; a uint32 block (bf16
    pairs) as two float32 blocks of its low and its high halves."""
    if x.dtype == jnp.float32:
        return (x,)
    low = jax.lax.bitcast_convert_type(jax.lax.shift_left(x, jnp.uint32(16)), jnp.float32)
    high = jax.lax.bitcast_convert_type(x & jnp.uint32(0xFFFF0000), jnp.float32)
    return low, high


def _kernel(x_ref, out_ref, *, block_rows: int, block_cols: int, full: int, rest):
    """x_ref is the whole [M, W] view (float32 values or uint32 bf16 pairs), out_ref the whole [M] float32 result."""
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_rows, block_rows), block_rows)

    def update(carry, x):
        running_max, running_sum = carry
        parts = _as_float32(x)
        new_max = functools.reduce(jnp.maximum, [jnp.max(p, axis=1) for p in parts], running_max)
        running_sum = running_sum * jnp.exp(running_max - new_max)
        for p in parts:
            running_sum += jnp.sum(jnp.exp(p - new_max[:, None]), axis=1)
        return new_max, running_sum

    def block(j, carry):
        return update(carry, x_ref[rows, pl.ds(pl.multiple_of(j * block_cols, block_cols), block_cols)])

    # The lowest finite float, not -inf: a row of -inf then gives exp(0) * 0 + 0, not exp(-inf + inf) = NaN.
    carry = (jnp.full((block_rows,), jnp.finfo(jnp.float32).min, jnp.float32), jnp.zeros((block_rows,), jnp.float32))
    if full:  # (a loop of no blocks would still trace a block's slice)
        carry = jax.lax.fori_loop(0, full, block, carry)
    for start, size in rest:
        carry = update(carry, x_ref[rows, pl.ds(start, size)])
    out_ref[rows] = carry[0] + jnp.log(carry[1])


def logsumexp_pallas(logits: jax.Array, *, block_rows: int | None = None, block_cols: int | None = None,
                     num_warps: int | None = None, interpret: bool = False) -> jax.Array:
    """The reference's result over logits [..., V] from one Pallas (Triton) kernel; the shape must pass
    `kernel_supported`. Launch shape: the module's constants unless given."""
    block_rows, block_cols = block_rows or BLOCK_ROWS, block_cols or BLOCK_COLS
    width = logits.shape[-1]
    rows = math.prod(logits.shape[:-1])
    if logits.ndim < 2 or not kernel_supported(rows, width, logits.dtype, block_rows, block_cols):
        raise ValueError(f"logsumexp_pallas: unsupported logits {logits.shape} {logits.dtype} (rows a multiple of "
                         f"{block_rows}, bf16 of an even width or float32, under 2**31 elements (bf16 pairs counted as "
                         f"one), the width {block_cols}-column blocks plus power-of-2 chunks of at least {MIN_CHUNK})")
    words = _words(width, logits.dtype)
    full, rest = column_blocks(words, block_cols)
    view = logits.reshape(rows, width)
    if view.dtype == jnp.bfloat16:
        view = jax.lax.bitcast_convert_type(view.reshape(rows, words, 2), jnp.uint32)
    (out,) = whole_array_call(
        functools.partial(_kernel, block_rows=block_rows, block_cols=block_cols, full=full, rest=rest),
        (rows // block_rows,), [view], [jax.ShapeDtypeStruct((rows,), jnp.float32)],
        num_warps=num_warps or NUM_WARPS, interpret=interpret, name="row_logsumexp")
    return out.reshape(logits.shape[:-1])


def row_logsumexp(logits: jax.Array, *, use_kernel: bool | None = None, interpret: bool = False) -> jax.Array:
    """logsumexp over the last dim of logits [B, ..., V] as float32 [B, ...]: the Pallas kernel on a GPU where the
    shape allows (or where `use_kernel` forces it: the CPU tests, interpreted), else `jax.nn.logsumexp`.
    Forward only: the loss (train/loss.py) writes its own backward."""
    if use_kernel is None:
        use_kernel = USE_KERNEL_ON_GPU and jax.default_backend() == "gpu"
    local_rows = rows_per_device(logits.shape[0]) if logits.ndim >= 2 else None
    if (not use_kernel or local_rows is None
            or not kernel_supported(local_rows * math.prod(logits.shape[1:-1]), logits.shape[-1], logits.dtype)):
        return reference(logits)
    return map_rows(functools.partial(logsumexp_pallas, interpret=interpret), logits)
