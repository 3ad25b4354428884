"""`act(x @ w + bias) + residual` as one Mosaic GPU kernel (Hopper: TMA loads, wgmma), for the frozen SigLIP tower.

Why: XLA runs each SigLIP projection as a cuBLAS GEMM and what follows it (bias, tanh-GELU, residual add) as
separate passes over the [tokens, width] activations, about a fifth of the tower's time on an H100
(docs/LOG.md). cuBLAS's own GELU epilogue is out of reach from XLA here: its pattern never matches in bf16. This
kernel applies that work to the float32 accumulator and writes the result once, rounded once.

Shape of the work: a persistent grid (one CTA per SM) walks the output tiles in a snake order (neighbouring tiles
share operands in L2). Each CTA has a memory warpgroup that streams [block_m, block_k] x tiles and
[block_k, 2·block_n] w tiles through a `stages`-deep TMA pipeline, and two compute warpgroups, each accumulating
one [block_m, block_n] half with wgmma. The epilogue goes by sub-tiles: + bias (a TMA-loaded row, broadcast),
activation, + residual (TMA-loaded into the staging buffer), one rounding, one TMA store.

Forward only: a custom VJP differentiates the jnp reference, so a tower someone unfreezes still trains. Off
Hopper GPUs, under a mesh, and for widths that are not whole tiles, XLA's ops run instead (`unfused`).
Measured in docs/LOG.md (sixth session).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = ("none", "gelu_tanh")
USE_KERNEL_ON_GPU = True  # tools/benchmark.py --vision-epilogue xla turns it off (the A/B measurement)
KERNEL_RESIDUAL = True    # --vision-epilogue pallas-nores: residual adds stay XLA's (the A/B measurement)


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_m: int = 128      # rows of a CTA tile (both compute warpgroups)
    block_n: int = 128      # columns per compute warpgroup; a CTA tile is block_m x 2·block_n
    block_k: int = 64
    stages: int = 3         # pipeline depth (TMA loads in flight)
    # Epilogue sub-tile. Each warpgroup has two staging slots; with two sub-tiles per warpgroup both residual
    # tiles are loaded while the main loop runs.
    epilogue_m: int = 128
    epilogue_n: int = 64
    snake_minor: int = 1    # the walk's minor dimension: 0 = M, 1 = N
    snake_width: int = 16   # tiles per band of the walk
    approx_math: bool = True  # tanh.approx (GELU): relative error ~2^-11, below the bf16 output's 2^-9


TILING = Tiling()


def gelu_tanh(v: jax.Array) -> jax.Array:
    """jax.nn.gelu(approximate=True), spelled out so the kernel and the reference run the same formula."""
    return 0.5 * v * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * (v * v * v))))


def reference(x, w, bias=None, residual=None, activation: str = "none"):
    """The kernel's math in jnp: float32 accumulation and epilogue, one rounding to x's dtype."""
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)


def unfused(x, w, bias=None, residual=None, activation: str = "none"):
    """The same math as XLA ops in x's dtype (a bf16 GEMM, then the epilogue as its own fusion): the path
    wherever the kernel does not run, identical to the tower's code before the kernel existed."""
    y = jnp.dot(x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if activation == "gelu_tanh":
        y = jax.nn.gelu(y, approximate=True)
    return y if residual is None else residual + y


def kernel_supported(m: int, k: int, n: int, dtype, tiling: Tiling = TILING) -> bool:
    """A Hopper GPU (wgmma is sm_90a only), bf16, and k, n that the tiling divides. Rows need only be a
    multiple of 8 (TMA's row tile): it zero-fills the loads past the last row and drops those stores
    (So400m/14: 729 patches per image).

    n is not padded here: a half-empty last column tile measured slower than XLA (So400m's width 1152), and
    TMA needs whole 64-element rows. Callers that can pad (the SigLIP MLP's 4304) do it on their side, to
    `padded_width`."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) != jnp.bfloat16:
        return False
    if getattr(jax.devices()[0], "compute_capability", "") != "9.0":
        return False
    return _tiles_fit(m, k, n, tiling)


def _tiles_fit(m: int, k: int, n: int, tiling: Tiling) -> bool:
    return m > 0 and m % 8 == 0 and n % (2 * tiling.block_n) == 0 and k % tiling.block_k == 0


def padded_width(n: int, tiling: Tiling = TILING) -> int:
    """n rounded up to whole CTA column tiles: the width a caller pads to with zeros (`SiglipMLP`'s 4304)."""
    return n + -n % (2 * tiling.block_n)


def uses_kernel(m: int, k: int, n: int, dtype, *, residual: bool = False) -> bool:
    """Whether `fused_matmul` takes the kernel for an [m, k] @ [k, n] call here (else XLA's ops)."""
    return (USE_KERNEL_ON_GPU and (KERNEL_RESIDUAL or not residual) and jax.sharding.get_abstract_mesh().empty
            and kernel_supported(m, k, n, dtype))


def _kernel(x_ref, w_ref, b_ref, r_ref, out_ref, *, tiling: Tiling, activation: str, interpreted: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    t = tiling
    m, k = x_ref.shape
    n = w_ref.shape[1]
    cta_n, em, en = 2 * t.block_n, t.epilogue_m, t.epilogue_n
    dtype = out_ref.dtype
    itemsize = jnp.dtype(dtype).itemsize

    def smem_layout(minor: int):
        swizzle = plgpu.find_swizzle(minor * itemsize * 8)
        return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)

    operand_layout, staging_layout = smem_layout(t.block_k), smem_layout(en)
    subtiles = [(i, j) for i in range(t.block_m // em) for j in range(t.block_n // en)]

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // t.block_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=t.stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((t.block_m, t.block_k), lambda s: (0, s), transforms=operand_layout,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((t.block_k, cta_n), lambda s: (s, 0), transforms=operand_layout,
                                      memory_space=plgpu.SMEM)])

    def no_op(*args, **kwargs):
        return None

    scoped = dict(allocations=pipeline(no_op, no_op).get_allocations(x_ref, w_ref),
                  staging=plgpu.SMEM((2, 2, em, en), dtype, transforms=staging_layout),
                  barriers=plgpu.Barrier(num_barriers=6))  # per warpgroup: bias, residual slot 0, slot 1
    if b_ref is not None:
        scoped["bias_smem"] = plgpu.SMEM((2, t.block_n), dtype)

    @functools.partial(pl.run_scoped, **scoped, collective_axes="wg")
    def _scope(allocations, staging, barriers, bias_smem=None):
        wg = lax.axis_index("wg")

        def _load_residual(index, rows, cols):
            i, j = subtiles[index]
            plgpu.copy_gmem_to_smem(r_ref.at[rows, cols].at[pl.ds(i * em, em), pl.ds(j * en, en)],
                                    staging.at[wg, index % 2], barriers.at[3 * wg + 1 + index % 2])

        def _epilogue(acc, rows, cols):
            for index, (i, j) in enumerate(subtiles):
                slot = index % 2
                buf, sub_rows, sub_cols = staging.at[wg, slot], pl.ds(i * em, em), pl.ds(j * en, en)
                if index >= 2:  # the first two slots were emptied (and filled) before the main loop
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # this slot's previous store has left
                    if r_ref is not None:
                        _load_residual(index, rows, cols)
                v = acc[i * em:(i + 1) * em, j * en:(j + 1) * en]
                if b_ref is not None:
                    if interpreted:  # the CPU interpreter has no rule for plgpu.load
                        b = bias_smem[wg, sub_cols]
                    else:  # a row vector in the accumulator's column layout, as broadcast_in_dim wants
                        b = plgpu.load(bias_smem.at[wg, sub_cols], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    v = v + lax.broadcast_in_dim(b.astype(jnp.float32), (em, en), [1])
                if activation == "gelu_tanh":
                    v = gelu_tanh(v)
                if r_ref is not None:
                    plgpu.barrier_wait(barriers.at[3 * wg + 1 + slot])
                    v = v + buf[...].astype(jnp.float32)
                buf[...] = v.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(buf, out_ref.at[rows, cols].at[sub_rows, sub_cols])

        tiles = (pl.cdiv(m, t.block_m), n // cta_n)

        @plgpu.nd_loop((tiles[0] * tiles[1],), collective_axes="sm")
        def _tile(loop):
            tile_m, tile_n = plgpu.planar_snake(loop.index[0], tiles, t.snake_minor, t.snake_width)
            rows = pl.ds(tile_m * t.block_m, t.block_m)
            cols = pl.ds(tile_n * cta_n + wg * t.block_n, t.block_n)   # this warpgroup's half

            def context(run_pipeline):
                # Both staging slots are free once the previous tile's stores have left; the bias and the
                # first residual sub-tiles then land while the main loop runs.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                if b_ref is not None:
                    plgpu.copy_gmem_to_smem(b_ref.at[cols], bias_smem.at[wg], barriers.at[3 * wg])
                if r_ref is not None:
                    for index in range(min(2, len(subtiles))):
                        _load_residual(index, rows, cols)

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.block_m, t.block_n), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if b_ref is not None:
                        plgpu.barrier_wait(barriers.at[3 * wg])
                    _epilogue(acc, rows, cols)

            def mma(_, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * t.block_n, t.block_n)])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, context)(x_ref.at[rows, :], w_ref.at[:, pl.ds(tile_n * cta_n, cta_n)],
                                   allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fused_matmul_pallas(x, w, bias=None, residual=None, *, activation: str = "none", tiling: Tiling = TILING,
                        interpret=None):
    """x [M, K] @ w [K, N] with the epilogue, as the Mosaic GPU kernel; k and n must be whole tiles (checked
    here). `interpret`: a Mosaic GPU interpret-mode params object (CPU tests)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (m, k), n = x.shape, w.shape[1]
    t = tiling
    # The CPU interpreter does not model TMA's zero-fill past the last row, so it gets whole tiles only.
    if (w.shape[0] != k or not _tiles_fit(m, k, n, t) or (interpret is not None and m % t.block_m)
            or (bias is not None and bias.shape != (n,)) or (residual is not None and residual.shape != (m, n))):
        raise ValueError(f"fused_matmul: unsupported shapes x {x.shape}, w {w.shape}, "
                         f"bias {None if bias is None else bias.shape}, "
                         f"residual {None if residual is None else residual.shape} for {t}")
    num_sms = 1 if interpret is not None else jax.devices()[0].core_count
    call = plgpu.kernel(
        functools.partial(_kernel, tiling=t, activation=activation, interpreted=interpret is not None),
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg", interpret=interpret,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=t.approx_math))
    return call(x, w.astype(x.dtype), None if bias is None else bias.astype(x.dtype),
                None if residual is None else residual.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("activation",))
def _kernel_call(x, w, bias, residual, activation):
    # A jitted call: the tower's many identical projections then share one lowering of the kernel (lowering
    # each call site anew took minutes for the 24-layer tower).
    return fused_matmul_pallas(x, w, bias, residual, activation=activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(x, w, bias, residual, activation):
    return _kernel_call(x, w, bias, residual, activation)


def _fused_fwd(x, w, bias, residual, activation):
    return _fused(x, w, bias, residual, activation), (x, w, bias, residual)


def _fused_bwd(activation, saved, d_out):
    _, pullback = jax.vjp(functools.partial(reference, activation=activation), *saved)
    return pullback(d_out)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_matmul(x, w, bias=None, residual=None, *, activation: str = "none"):
    """act(x @ w + bias) + residual over the last dim of x [..., K], w [K, N], bias [N], residual [..., N].

    The Mosaic GPU kernel (float32 epilogue, one rounding) on a Hopper GPU when `kernel_supported` accepts the
    shape and no mesh is active; XLA's ops (`unfused`) otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_matmul: activation must be one of {ACTIVATIONS}, got {activation!r}")
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[-1]
    m = math.prod(lead)
    if not uses_kernel(m, k, n, x.dtype, residual=residual is not None):
        return unfused(x, w, bias, residual, activation)
    flat = _fused(x.reshape(m, k), w, bias, None if residual is None else residual.reshape(m, n), activation)
    return flat.reshape(*lead, n)
