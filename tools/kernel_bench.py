#!/usr/bin/env python
"""Time `fused_matmul`'s kernel against XLA's plain GEMM at the SigLIP towers' projection shapes, on the device.

  python tools/kernel_bench.py [--vision large256 so400m384] [--batch 64] [--reps 10]

Each figure is measured inside one jit: a `fori_loop` of n calls, each reading an input that the previous call
wrote one element of, timed at n and 2n calls; per call = (T(2n) − T(n)) / n. Host dispatch (50–120 µs per
jitted call on the device machine) and the gaps between jit calls drop out; the loop's own per-iteration cost
stays in, the same for both columns: on an H100 a loop of tiny calls still takes 15–19 µs per iteration (its
kernels are launched from the host one by one), so calls much shorter than ~20 µs, such as decode's, cannot be
timed this way (docs/LOG.md, eighth session); the towers' 50–700 µs calls can. Timing one jitted call per kernel,
as the sixth session's sweeps did, sat near that floor for the N = 1024 projections (docs/LOG.md, seventh session).

One JSON line per projection: the kernel's µs and TFLOP/s with its largest error against the float32 reference
(where `fused_matmul.kernel_supported` takes the shape), and XLA's GEMM alone (cuBLAS, no bias or activation: in
this loop XLA would compute a separate epilogue pass for the one element read back, so it is left out).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ghostvis_jax.config import preset
from ghostvis_jax.model import fused_matmul

VISION = {"large256": "siglip-large-patch16-256", "so400m384": "siglip-so400m-patch14-384"}


def per_call_seconds(fn, x, *args, reps: int = 10) -> float:
    """Device time of one fn(x, *args) call, from loops of reps and 2·reps dependent calls inside one jit."""
    def loop_of(n):
        def body(_, carry):
            return carry.at[0, 0].set(fn(carry, *args)[0, 0].astype(carry.dtype))
        return jax.jit(lambda x0, *a: lax.fori_loop(0, n, body, x0))

    best = []
    for n in (reps, 2 * reps):
        loop = loop_of(n)
        jax.block_until_ready(loop(x, *args))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(loop(x, *args))
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return max(best[1] - best[0], 1e-9) / reps


def projections(vision: str, batch: int):
    """(name, M, K, N, bias, residual, activation) of the tower's four projections (q/k/v share one shape)."""
    cfg = preset(vision=VISION[vision]).vision
    m, d = batch * cfg.num_patches, cfg.hidden_size
    mlp = fused_matmul.padded_width(cfg.intermediate_size)  # as SiglipMLP pads it for the kernel
    return [("q", m, d, d, True, False, "none"), ("out_proj+res", m, d, d, True, True, "none"),
            ("fc1+gelu", m, d, mlp, True, False, "gelu_tanh"), ("fc2+res", m, mlp, d, True, True, "none")]


def measure(name, m, k, n, has_bias, has_residual, activation, *, reps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(scale=k ** -0.5, size=(k, n)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=(n,)), jnp.bfloat16) if has_bias else None
    residual = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16) if has_residual else None
    flops = 2 * m * k * n
    row = dict(projection=name, m=m, k=k, n=n, activation=activation, residual=has_residual)
    gemm = per_call_seconds(lambda a, b: jnp.dot(a, b), x, w, reps=reps)
    row.update(xla_gemm_us=round(gemm * 1e6, 1), xla_gemm_tflops=round(flops / gemm / 1e12, 1))
    if fused_matmul.kernel_supported(m, k, n, x.dtype):
        kernel = functools.partial(fused_matmul.fused_matmul_pallas, activation=activation)
        want = fused_matmul.reference(x, w, bias, residual, activation).astype(jnp.float32)
        error = jnp.max(jnp.abs(jax.jit(kernel)(x, w, bias, residual).astype(jnp.float32) - want))
        seconds = per_call_seconds(kernel, x, w, bias, residual, reps=reps)
        row.update(kernel_us=round(seconds * 1e6, 1), kernel_tflops=round(flops / seconds / 1e12, 1),
                   kernel_max_error=float(error))
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vision", nargs="+", choices=sorted(VISION), default=sorted(VISION))
    ap.add_argument("--batch", type=int, default=64, help="images per call (the vision bench's batch)")
    ap.add_argument("--reps", type=int, default=10, help="calls per timed loop (the loops run n and 2n)")
    args = ap.parse_args(argv)
    rows = []
    for vision in args.vision:
        for shape in projections(vision, args.batch):
            row = dict(vision=vision, device=jax.devices()[0].device_kind, **measure(*shape, reps=args.reps))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
