"""Rotary position embeddings (RoPE) as HF Qwen2 applies them, and the fused q|k|v projection [B, T, K, G+2, H]
split into cuDNN's q [B, T, N, H], k and v [B, T, K, H] with RoPE on q and k, that split and its gradient as
Pallas (Triton) kernels.

Why: the training step's attention needs q, k and v as separate arrays, and its backward gives their gradients
back separately. XLA ran the forward split as three slice fusions (73 µs per layer of train-sft) and the
backward assembly (inverse RoPE of dq and dk, then the [.., G+2, ..] concatenation with dv) as one fusion at ~0.9
TB/s: 151 µs per layer, 3.6 ms of a 236 ms step on an H100 (docs/LOG.md, fourteenth session). Each is one read and
one write of the same bytes, ~45 µs at bandwidth. Here each program takes a block of tokens of one kv head: its G
query heads, its key and its value, both halves of each head at once (RoPE pairs column i with i + H/2).

The kernels' math is `apply_rope`'s: float32, one rounding. The backward is RoPE's transpose in float32, rounded
once; autodiff rounds each product to bf16 before adding them, so it is the one further from the exact
gradient. Off a GPU, under tensor parallelism and for shapes the kernels do not take, the jnp reference runs;
under FSDP the kernels run per device through shard_map (each token is independent).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ghostvis_jax.model.triton_call import whole_array_call
from ghostvis_jax.sharding import map_rows, rows_per_device

USE_KERNEL_ON_GPU = True  # tools/benchmark.py --qkv-split xla turns it off (the A/B measurement)
BLOCK_TOKENS = 16
NUM_WARPS = 4


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, head_dim] in HF's layout (the frequency table repeated twice, not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, ..., H], cos/sin [B, T, H]; HF `rotate_half`: (x1, x2) -> (-x2, x1)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos.reshape(cos.shape[:2] + (1,) * (x.ndim - cos.ndim) + cos.shape[2:])
    sin = sin.reshape(cos.shape)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def split_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array):
    """qkv [B, T, K, G+2, H] → q [B, T, K·G, H] (query head j·G + g is qkv[.., j, g, :]), k, v [B, T, K, H]."""
    b, t, kv, slots, h = qkv.shape
    group = slots - 2
    qk = apply_rope(qkv[..., :group + 1, :], cos, sin)
    return qk[..., :group, :].reshape(b, t, kv * group, h), qk[..., group, :], qkv[..., group + 1, :]


def kernel_supported(qkv_shape, dtype) -> bool:
    if len(qkv_shape) != 5:
        return False
    b, t, _, slots, h = qkv_shape
    return (slots >= 3 and h % 2 == 0 and h // 2 >= 16 and (h // 2) & (h // 2 - 1) == 0
            and (b * t) % BLOCK_TOKENS == 0 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and math.prod(qkv_shape) < 2**31)


def rope_halves(x1, x2, c1, c2, s1, s2, *, transpose: bool = False):
    """RoPE on a head split in halves (float32): (x1·c1 − x2·s1, x2·c2 + x1·s2), or its transpose. The Pallas
    kernels' form of `apply_rope` (here and in model/decode_attention.py)."""
    if transpose:
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


def _program_block(cos_ref, sin_ref, half: int):
    """A program's tokens, kv head, the two half-head column ranges, and its (c1, c2, s1, s2) tiles."""
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * BLOCK_TOKENS, BLOCK_TOKENS), BLOCK_TOKENS)
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    return rows, pl.program_id(1), lo, hi, [ref[rows, cols] for ref in (cos_ref, sin_ref) for cols in (lo, hi)]


def _split_kernel(qkv_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, *, group: int, half: int):
    """qkv_ref [M, K, G+2, H], cos/sin [M, H], q [M, K·G, H], k/v [M, K, H]; program (token block, kv head j)."""
    rows, j, lo, hi, trig = _program_block(cos_ref, sin_ref, half)
    for slot in range(group + 2):
        x1, x2 = qkv_ref[rows, j, slot, lo], qkv_ref[rows, j, slot, hi]
        if slot == group + 1:
            v_ref[rows, j, lo], v_ref[rows, j, hi] = x1, x2
            continue
        y1, y2 = rope_halves(x1.astype(jnp.float32), x2.astype(jnp.float32), *trig)
        out, head = (k_ref, j) if slot == group else (q_ref, j * group + slot)
        out[rows, head, lo], out[rows, head, hi] = y1.astype(out.dtype), y2.astype(out.dtype)


def _grad_kernel(dq_ref, dk_ref, dv_ref, cos_ref, sin_ref, dqkv_ref, *, group: int, half: int):
    """The transpose of `_split_kernel`: dq [M, K·G, H], dk/dv [M, K, H] → dqkv [M, K, G+2, H]."""
    rows, j, lo, hi, trig = _program_block(cos_ref, sin_ref, half)
    for slot in range(group + 2):
        if slot == group + 1:
            dqkv_ref[rows, j, slot, lo], dqkv_ref[rows, j, slot, hi] = dv_ref[rows, j, lo], dv_ref[rows, j, hi]
            continue
        src, head = (dk_ref, j) if slot == group else (dq_ref, j * group + slot)
        d1, d2 = rope_halves(src[rows, head, lo].astype(jnp.float32), src[rows, head, hi].astype(jnp.float32),
                             *trig, transpose=True)
        dtype = dqkv_ref.dtype
        dqkv_ref[rows, j, slot, lo], dqkv_ref[rows, j, slot, hi] = d1.astype(dtype), d2.astype(dtype)


def _call(kernel, inputs, cos, sin, out_shapes, *, kv: int, interpret: bool, name: str):
    """One kernel over (token blocks, kv heads); `inputs` are token-leading, cos/sin [B, T, H] join them flat."""
    inputs = inputs + [a.reshape(-1, a.shape[-1]).astype(jnp.float32) for a in (cos, sin)]
    return whole_array_call(kernel, (inputs[0].shape[0] // BLOCK_TOKENS, kv), inputs, out_shapes,
                            num_warps=NUM_WARPS, interpret=interpret, name=name)


def split_pallas(qkv, cos, sin, *, interpret: bool = False):
    """`split_reference`'s result from one Pallas (Triton) kernel; shapes must pass `kernel_supported`."""
    b, t, kv, slots, h = qkv.shape
    if not kernel_supported(qkv.shape, qkv.dtype) or cos.shape != (b, t, h) or sin.shape != cos.shape:
        raise ValueError(f"split_pallas: unsupported shapes qkv {qkv.shape} {qkv.dtype}, cos {cos.shape}, sin "
                         f"{sin.shape} (tokens a multiple of {BLOCK_TOKENS}, half precision, H/2 a power of 2 >= 16)")
    m, group = b * t, slots - 2
    q_shape, kv_shape = jax.ShapeDtypeStruct((m, kv * group, h), qkv.dtype), jax.ShapeDtypeStruct((m, kv, h), qkv.dtype)
    out_shapes = [q_shape, kv_shape, kv_shape]
    q, k, v = _call(functools.partial(_split_kernel, group=group, half=h // 2), [qkv.reshape(m, kv, slots, h)], cos,
                    sin, out_shapes, kv=kv, interpret=interpret, name="qkv_rope_split")
    return q.reshape(b, t, kv * group, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)


def split_grad_pallas(dq, dk, dv, cos, sin, *, interpret: bool = False):
    """The gradient of `split_pallas` with respect to qkv, from one Pallas (Triton) kernel."""
    b, t, kv, h = dk.shape
    group = dq.shape[2] // kv
    if dq.shape != (b, t, kv * group, h) or dv.shape != dk.shape or not kernel_supported((b, t, kv, group + 2, h),
                                                                                          dq.dtype):
        raise ValueError(f"split_grad_pallas: unsupported shapes dq {dq.shape} {dq.dtype}, dk {dk.shape}, "
                         f"dv {dv.shape}")
    m = b * t
    (dqkv,) = _call(functools.partial(_grad_kernel, group=group, half=h // 2),
                    [dq.reshape(m, kv * group, h), dk.reshape(m, kv, h), dv.reshape(m, kv, h)], cos, sin,
                    [jax.ShapeDtypeStruct((m, kv, group + 2, h), dq.dtype)], kv=kv, interpret=interpret,
                    name="qkv_rope_grad")
    return dqkv.reshape(b, t, kv, group + 2, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_path(qkv, cos, sin, interpret):
    return split_pallas(qkv, cos, sin, interpret=interpret)


def _kernel_path_fwd(qkv, cos, sin, interpret):
    return _kernel_path(qkv, cos, sin, interpret), (cos, sin)


def _kernel_path_bwd(interpret, saved, cotangents):
    cos, sin = saved
    dq, dk, dv = cotangents
    # cos/sin are functions of the positions only (no parameter): their cotangents are zero.
    return split_grad_pallas(dq, dk, dv, cos, sin, interpret=interpret), jnp.zeros_like(cos), jnp.zeros_like(sin)


_kernel_path.defvjp(_kernel_path_fwd, _kernel_path_bwd)


def split_qkv_rope(qkv, cos, sin, *, use_kernel: bool | None = None, interpret: bool = False):
    """qkv [B, T, K, G+2, H] → (q [B, T, K·G, H], k, v [B, T, K, H]) with RoPE on q and k (cos/sin [B, T, H]).

    The Pallas kernels on a GPU where the shape allows (per device under FSDP), `split_reference` elsewhere."""
    if use_kernel is None:
        use_kernel = USE_KERNEL_ON_GPU and jax.default_backend() == "gpu"
    local_rows = rows_per_device(qkv.shape[0])
    if not use_kernel or local_rows is None or not kernel_supported((local_rows,) + qkv.shape[1:], qkv.dtype):
        return split_reference(qkv, cos, sin)
    return map_rows(functools.partial(_kernel_path, interpret=interpret), qkv, cos, sin)
