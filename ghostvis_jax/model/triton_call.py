"""One Pallas (Triton) call whose refs are whole arrays, for the row-pass kernels of this project (RMSNorm, the
residual LayerNorm, the SwiGLU backward, the q|k|v split, the loss's log-sum-exp).

Each of those kernels picks its own block from the program ids instead of a BlockSpec's rectangle, because its
block is not one: power-of-2 column chunks of widths that are not (1152, 1536), the gate and up halves of a row
far apart, a kv head's query group with its key and value. Triton then loads exactly what the kernel indexes.
Triton's blocks are powers of 2, so a row whose width is not is read as power-of-2 column chunks.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

MIN_CHUNK = 16  # the narrowest column chunk the kernels load
MAX_CHUNKS = 4  # the most chunks a norm kernel unrolls over a row


def power_of_2_chunks(width: int, *, start: int = 0) -> tuple[tuple[int, int], ...] | None:
    """(start, size) chunks covering [start, start + width), power-of-2 sizes (Triton's block shapes), largest
    first; () for no width, None when one would be under MIN_CHUNK columns."""
    chunks = []
    for bit in reversed(range(width.bit_length())):
        if width & (1 << bit):
            chunks.append((start, 1 << bit))
            start += 1 << bit
    return None if chunks and chunks[-1][1] < MIN_CHUNK else tuple(chunks)


def column_chunks(width: int) -> tuple[tuple[int, int], ...] | None:
    """A whole row of a norm kernel as `power_of_2_chunks` (1152 = 1024 + 128, 1536 = 1024 + 512); None for no
    width or more than MAX_CHUNKS chunks."""
    chunks = power_of_2_chunks(width)
    return chunks if chunks and len(chunks) <= MAX_CHUNKS else None


def whole_array_call(kernel, grid: tuple[int, ...], inputs, out_shapes, *, num_warps: int, interpret: bool,
                     name: str) -> list:
    """kernel(*input_refs, *output_refs) over `grid`, every ref the whole array; returns the outputs as a list."""
    from jax.experimental.pallas import triton as plgpu

    whole = lambda shape: pl.BlockSpec(shape, lambda *program_ids: (0,) * len(shape))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole(a.shape) for a in inputs],
        out_specs=[whole(s.shape) for s in out_shapes],
        out_shape=list(out_shapes),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*inputs)
