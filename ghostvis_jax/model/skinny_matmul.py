"""The decode step's projections for few rows (≤ 64), as Pallas (Triton) GEMMs.

Why: at decode the GEMMs only stream their weights, so what matters is keeping all of an H100's SMs reading.
XLA's GEMMs at 8-64 rows took 3-5 µs longer than their weight bytes need (docs/LOG.md, eighth session), and the
decoder MLP paid one more kernel for the SwiGLU product. Here each kernel is many small programs (several per
SM, so no half-empty last wave): the gate|up GEMM computes `silu(gate) * up` from its float32 accumulators
and writes only the product; o_proj and down_proj split K when their columns alone make too few programs, their
float32 partial sums added by XLA in the fusion that adds the residual; q|k|v does not split K, so its bias goes
in the epilogue (XLA split it and added the bias in a pass of its own).

Forward only: decode has no gradient. `IMPLEMENTATION` picks the path: "auto" (the kernels on a GPU without a
mesh from AUTO_MIN_ROWS rows, XLA elsewhere), "pallas" (always; interpreted off a GPU: the tests) or "xla".
On an H100 the decode step at batch 64 took 2.02-2.06 ms with the MLP and o_proj kernels against 2.14-2.16 with
XLA's GEMMs (ninth session), and 1.98-2.04 with the q|k|v kernel too (tenth); at 8 rows (batch 1) XLA's were as
fast or faster (docs/LOG.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

IMPLEMENTATION = "auto"  # tools/benchmark.py --decode-gemm xla sets "xla" (the A/B measurement)
MAX_ROWS = 64
AUTO_MIN_ROWS = 16  # "auto" leaves 8 rows (batch 1..8) to XLA: measured no faster there
_DOT_MIN_DIM = 16  # a Triton dot needs every dim >= 16: fewer rows are padded with zeros
# Launch shapes from the session-9 and -10 sweeps on an H100 (decode's GEMMs at 8-64 rows; docs/LOG.md).
BLOCK_N, BLOCK_K, STAGES = 64, 128, 4
SWIGLU_BLOCK_N, SWIGLU_BLOCK_K, SWIGLU_STAGES = 32, 64, 3
BIAS_BLOCK_N = 32  # with a bias (q|k|v): no K split, so the bias goes in the epilogue; 32 columns per program
NUM_WARPS = 4
# K is split until the programs reach about one per SM: 4 splits for o_proj and 5 for down_proj at Qwen2.5-1.5B
# (24 column blocks each) measured best; 6 and 10 were slower, and in the whole decode step (with the fusions that
# add the partial sums) 2 / 2, 4 / 2 and 6 / 7 were 2-9% slower at batch 64 (eleventh session).
TARGET_PROGRAMS = 128


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _kernel(x_ref, w_ref, *refs, block_k: int, swiglu: bool):
    """x_ref [M, Ks] (this split's K), w_ref [Ks, 2, BN] (gate, up) or [Ks, BN], then an optional bias [BN] and
    out_ref [M, BN]: the SwiGLU product, or the (partial) product in out_ref's dtype (with the bias: the product
    rounded, plus the bias, rounded again: XLA's rounding of a dot, then a bias add)."""
    bias_ref, out_ref = refs if len(refs) == 2 else (None, refs[0])
    rows, k_len = x_ref.shape
    zero = jnp.zeros((rows, w_ref.shape[-1]), jnp.float32)

    def body(step, accs):
        ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        x = x_ref[:, ks]
        if swiglu:
            return accs[0] + _dot(x, w_ref[ks, 0, :]), accs[1] + _dot(x, w_ref[ks, 1, :])
        return (accs[0] + _dot(x, w_ref[ks, :]),)

    accs = lax.fori_loop(0, k_len // block_k, body, (zero, zero) if swiglu else (zero,))
    out = accs[0] * jax.nn.sigmoid(accs[0]) * accs[1] if swiglu else accs[0]
    if bias_ref is not None:
        out = out.astype(out_ref.dtype).astype(jnp.float32) + bias_ref[...].astype(jnp.float32)[None, :]
    out_ref[...] = out.astype(out_ref.dtype)


def num_splits(k: int, n: int) -> int:
    """K splits for a [*, k] @ [k, n] GEMM: the most (dividing K's blocks) that keep the programs at or below
    TARGET_PROGRAMS, at least 1."""
    steps, cols = k // BLOCK_K, n // BLOCK_N
    return max([s for s in range(1, steps + 1) if steps % s == 0 and cols * s <= TARGET_PROGRAMS] or [1])


def supported(rows: int, k: int, n: int, dtype) -> bool:
    """Whether `matmul` (n output columns) or `decode_mlp` (n = the intermediate size) takes these shapes."""
    return (0 < rows <= MAX_ROWS and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and k % BLOCK_K == 0
            and k % SWIGLU_BLOCK_K == 0 and n % BLOCK_N == 0 and n % SWIGLU_BLOCK_N == 0 and n % BIAS_BLOCK_N == 0)


def applies(rows: int, k: int, n: int, dtype) -> bool:
    """Whether the decode step should take the kernels here (IMPLEMENTATION, backend, no mesh, shapes)."""
    if IMPLEMENTATION == "xla" or (IMPLEMENTATION == "auto" and (jax.default_backend() != "gpu"
                                                                  or rows < AUTO_MIN_ROWS)):
        return False
    return jax.sharding.get_abstract_mesh().empty and supported(rows, k, n, dtype)


def mlp_applies(rows: int, hidden: int, width: int, dtype) -> bool:
    """`applies` for `decode_mlp`: both of its GEMMs, [hidden → 2 × width] and [width → hidden]."""
    return applies(rows, hidden, width, dtype) and supported(rows, width, hidden, dtype)


def _pad_rows(x):
    """x [M, K] with zero rows appended up to a power of 2 >= _DOT_MIN_DIM (the kernels' row block)."""
    rows = x.shape[0]
    return jnp.pad(x, ((0, max(_DOT_MIN_DIM, pl.next_power_of_2(rows)) - rows), (0, 0)))


def _call(x, w, bias=None, *, swiglu: bool, splits: int, name: str):
    """x [M_pad, K] (M_pad a power of 2 >= 16) → [M_pad, N] (one split, x.dtype) or [splits, M_pad, N] float32."""
    rows, k = x.shape
    n = w.shape[-1]
    block_n, block_k, stages = ((SWIGLU_BLOCK_N, SWIGLU_BLOCK_K, SWIGLU_STAGES) if swiglu
                                else (BLOCK_N if bias is None else BIAS_BLOCK_N, BLOCK_K, STAGES))
    k_split = k // splits
    w_block = (k_split, 2, block_n) if swiglu else (k_split, block_n)
    w_index = (lambda j, s: (s, 0, j)) if swiglu else (lambda j, s: (s, j))
    if splits == 1:
        out_spec = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
    else:
        out_spec = pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
    bias_specs = [] if bias is None else [pl.BlockSpec((block_n,), lambda j, s: (j,))]
    return pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, swiglu=swiglu),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((rows, k_split), lambda j, s: (0, s)), pl.BlockSpec(w_block, w_index), *bias_specs],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=stages),
        interpret=jax.default_backend() != "gpu",
        name=name,
    )(x, w, *([] if bias is None else [bias]))


def _check(x_shape, dtype, w, n: int, what: str):
    if len(x_shape) != 2 or x_shape[1] != w.shape[0] or w.dtype != dtype or not supported(*x_shape, n, dtype):
        raise ValueError(f"{what}: x {tuple(x_shape)} {jnp.dtype(dtype).name}, w {w.shape} {w.dtype}: not "
                         f"supported (at most {MAX_ROWS} rows, half precision, K a multiple of {BLOCK_K}, N of "
                         f"{BLOCK_N})")


def _matmul_padded(x, w, splits: int | None):
    steps = x.shape[1] // BLOCK_K
    splits = splits or num_splits(x.shape[1], w.shape[1])
    if splits < 1 or steps % splits:
        raise ValueError(f"skinny_matmul: splits={splits} must divide K's {steps} blocks of {BLOCK_K}")
    out = _call(x, w, swiglu=False, splits=splits, name="skinny_matmul")
    return out if splits == 1 else out.sum(axis=0).astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, splits: int | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] (+ bias [N]) → [M, N] in x.dtype, float32 accumulation (rounded once after the split-K
    sum). With a bias K is not split: the bias is added in the kernel, after rounding the product as XLA does."""
    _check(x.shape, x.dtype, w, w.shape[-1], "skinny_matmul.matmul")
    rows = x.shape[0]
    x = _pad_rows(x)
    if bias is None:
        return _matmul_padded(x, w, splits)[:rows]
    if bias.shape != (w.shape[-1],) or bias.dtype != x.dtype or splits not in (None, 1):
        raise ValueError(f"skinny_matmul.matmul: bias {bias.shape} {bias.dtype.name} with splits={splits}: a bias "
                         f"must be [{w.shape[-1]}] {x.dtype.name}, and K is not split with one")
    return _call(x, w, bias, swiglu=False, splits=1, name="skinny_matmul_bias")[:rows]


def decode_mlp(x: jax.Array, gate_up: jax.Array, down: jax.Array, *, splits: int | None = None) -> jax.Array:
    """Qwen2's MLP: (silu(x @ gate_up[:, 0]) * (x @ gate_up[:, 1])) @ down for x [M, D], gate_up [D, 2, I],
    down [I, D] → [M, D] in x.dtype. The SwiGLU product is rounded once, from float32 (XLA's path rounds the
    projection first)."""
    width = gate_up.shape[-1]
    if gate_up.ndim != 3 or gate_up.shape[1] != 2 or down.shape[0] != width:
        raise ValueError(f"skinny_matmul.decode_mlp: gate_up {gate_up.shape}, down {down.shape}: expected "
                         f"[D, 2, I] and [I, D]")
    _check(x.shape, x.dtype, gate_up, width, "skinny_matmul.decode_mlp (gate|up)")
    _check((x.shape[0], width), x.dtype, down, down.shape[-1], "skinny_matmul.decode_mlp (down)")
    rows = x.shape[0]
    h = _call(_pad_rows(x), gate_up, swiglu=True, splits=1, name="skinny_swiglu_matmul")
    return _matmul_padded(h, down, splits)[:rows]
