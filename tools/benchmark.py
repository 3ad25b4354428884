#!/usr/bin/env python
"""GPU benchmarks of the real train step, vision tower and generate code at the 1.5B shapes, random weights.

The same benches, shapes and FLOP formula as the PyTorch peer (shared/bench/torch_peer.py); one JSON line per
measurement with the peer's fields, so tools/bench_compare.py can print ratios from one device call.

  python tools/benchmark.py train-sft [--batch 8 --seq 2048 --image-tokens 64 --unfreeze 4 --steps 5]
  python tools/benchmark.py train-align | train-full | vision [--vision so400m384] | generate
Options beyond the peer's: --remat, --mesh-data/--mesh-fsdp, --replicate-frozen, --chunk (loss chunk size),
--unroll (decode steps per loop iteration), --decode-attn (Pallas decode kernel or XLA), --decode-block-k,
--decode-warps/--decode-stages, --decode-splits (programs per row and kv head of the decode step), --decode-gemm
(the decode step's few-row GEMM kernels or XLA), --swiglu-grad (the SwiGLU backward's Pallas kernel or XLA),
--qkv-split (the q|k|v split with RoPE and its gradient as Pallas kernels, or XLA), --loss-lse (the loss's
one-pass log-sum-exp kernel or XLA's two reductions), --rms-norm (the decoder's RMSNorm kernels or XLA),
--vision-epilogue (SigLIP's fused-epilogue matmul or XLA), --vision-norm (SigLIP's residual add + LayerNorm kernel or
XLA), --compute-dtype and --losses --lr (the bf16 vs float32 numerics check), --profile DIR (where the GPU time
goes, tools/trace_summary.py), --tiny (tiny shapes: checks the tool on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ghostvis_jax import sharding
from ghostvis_jax.config import ResamplerConfig, preset
from ghostvis_jax.train import setup as train_setup
from ghostvis_jax.train.config import base_config
from ghostvis_jax.train.feedback import peak_memory_gib
from ghostvis_jax.train.flops import PEAK_BF16_FLOPS, train_step_flops, vision_flops_per_image

VISION = {"large256": "siglip-large-patch16-256", "so400m384": "siglip-so400m-patch14-384",
          "base224": "siglip-base-patch16-224"}


def emit(**kw) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    print(json.dumps({"peer": "jax", **kw, **({"xla_flags": flags} if flags else {})}), flush=True)


def profiled(args, name: str, fn, steps: int) -> None:
    """Run fn() (`steps` steps of work) under jax.profiler and print where the GPU time went."""
    if not args.profile:
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_summary

    folder = os.path.join(args.profile, name)
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        jax.block_until_ready(fn())
    print(f"--- profile {name} ({steps} steps) ---", flush=True)
    events = trace_summary.load_events(trace_summary.find_trace(folder))
    print(trace_summary.summarize(events, args.profile_top, steps), flush=True)


def model_config(args):
    if args.tiny:
        from ghostvis_jax.testing.tiny_training import tiny_model_config

        return tiny_model_config(num_layers=args.unfreeze + 1)
    cfg = preset("qwen2.5-1.5b", VISION[args.vision])
    return dataclasses.replace(cfg, resampler=ResamplerConfig(num_latents=args.image_tokens),
                               image_token_id=cfg.llm.vocab_size - 1)


def bench_train(args, stage: str) -> None:
    from ghostvis_jax.model import rms_norm, rope, swiglu
    from ghostvis_jax.train import logsumexp

    swiglu.USE_KERNEL_ON_GPU = args.swiglu_grad == "pallas"
    rope.USE_KERNEL_ON_GPU = args.qkv_split == "pallas"
    logsumexp.USE_KERNEL_ON_GPU = args.loss_lse == "pallas"
    rms_norm.USE_KERNEL_ON_GPU = args.rms_norm == "pallas"
    mcfg = model_config(args)
    c = base_config()
    c.stage, c.init, c.seed, c.num_trainable_layers = stage, "random", 0, args.unfreeze
    c.remat, c.loss_chunk_tokens = args.remat, args.chunk
    c.compute_dtype = args.compute_dtype
    if args.lr:
        c.optim.projector_lr = c.optim.resampler_lr = c.optim.llm_lr = args.lr
        c.optim.warmup_steps = 1
    if args.compute_dtype == "float32":
        c.frozen_param_dtype = "float32"
    c.mesh.data, c.mesh.fsdp = args.mesh_data, args.mesh_fsdp
    c.mesh.shard_frozen = not args.replicate_frozen
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    t0 = time.perf_counter()
    setup = train_setup.build(mcfg, c, mesh, total_steps=1000)
    n_dev = jax.device_count()
    B, T, N = args.batch * n_dev, args.seq, mcfg.num_image_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(0, mcfg.llm.vocab_size - 1, size=(1, B, T)).astype(np.int32)
    mask = np.ones((1, B, T), np.float32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, axis=-1), "loss_mask": mask}
    images = 0
    if stage != "full":
        ids[:, :, 2:2 + N] = mcfg.image_token_id
        mask[:, :, :2 + N] = 0.0
        size = mcfg.vision.image_size
        batch["pixel_values"] = rng.normal(size=(1, B, size, size, 3)).astype(np.float32)
        images = B
    if args.loss_fraction < 1.0:  # a prompt before each answer: only the row's last positions carry a loss
        start = 2 + N if stage != "full" else 0
        mask[:, :, start:T - round((T - start) * args.loss_fraction)] = 0.0
    batch = {k: jax.device_put(v, s) for (k, v), s in
             zip(batch.items(), setup.batch_shardings(batch, micro_axis=True).values())}
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = setup.train_step.lower(setup.state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    losses = []
    for i in range(args.steps + 3):
        if i == 3:
            jax.block_until_ready(setup.state)
            t1 = time.perf_counter()
        setup.state, metrics = compiled(setup.state, setup.frozen, batch)
        if args.losses:
            losses.append(float(metrics["loss"]))
    jax.block_until_ready(setup.state)
    dt = (time.perf_counter() - t1) / args.steps

    def two_steps():
        for _ in range(2):
            setup.state, _ = compiled(setup.state, setup.frozen, batch)
        return setup.state

    profiled(args, f"train-{stage}", two_steps, 2)
    flops = train_step_flops(mcfg, stage=stage, batch=B, seq=T, num_images=images,
                             trainable_layers=args.unfreeze)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.state["params"]))
    emit(bench=f"train-{stage}", batch=args.batch, seq=T, image_tokens=N if images else 0,
         unfreeze=args.unfreeze if stage == "sft" else (mcfg.llm.num_layers if stage == "full" else 0), vision=args.vision,
         devices=n_dev, mesh=dict(mesh.shape), shard_frozen=not args.replicate_frozen, remat=args.remat,
         step_ms=round(dt * 1e3, 2),
         tokens_per_s=round(B * T / dt), tokens_per_s_per_device=round(B * T / dt / n_dev),
         images_per_s=round(images / dt, 1), tflops=round(flops / dt / 1e12, 1),
         mfu=round(flops / dt / (PEAK_BF16_FLOPS * n_dev), 4), trainable_params=trainable, peak_gib=round(peak_memory_gib(), 1),
         init_s=round(init_s, 1), compile_s=round(compile_s, 1), loss=float(metrics["loss"]),
         compute_dtype=args.compute_dtype, swiglu_grad=args.swiglu_grad, qkv_split=args.qkv_split,
         loss_lse=args.loss_lse, rms_norm=args.rms_norm,
         loss_chunk=args.chunk, loss_fraction=args.loss_fraction,
         **({"losses": losses} if args.losses else {}),
         device=jax.devices()[0].device_kind)


def bench_vision(args) -> None:
    from flax import nnx

    from ghostvis_jax.model import fused_matmul, residual_norm
    from ghostvis_jax.model.siglip import SiglipVisionTower

    fused_matmul.USE_KERNEL_ON_GPU = args.vision_epilogue != "xla"
    residual_norm.USE_KERNEL_ON_GPU = args.vision_norm == "pallas"
    fused_matmul.KERNEL_RESIDUAL = args.vision_epilogue == "pallas"
    vcfg = model_config(args).vision if args.tiny else preset(vision=VISION[args.vision]).vision
    tower = SiglipVisionTower(vcfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(tower)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, vcfg.image_size, vcfg.image_size, 3)),
                    jnp.bfloat16)
    out = jax.block_until_ready([forward(state, x) for _ in range(3)])  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = forward(state, x)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.steps
    profiled(args, f"vision-{args.vision}", lambda: [forward(state, x) for _ in range(2)], 2)
    fl = vision_flops_per_image(vcfg) * args.batch / dt
    emit(bench="vision", vision=args.vision, batch=args.batch, step_ms=round(dt * 1e3, 2),
         images_per_s=round(args.batch / dt), tflops=round(fl / 1e12, 1), mfu=round(fl / PEAK_BF16_FLOPS, 4),
         vision_epilogue=args.vision_epilogue, vision_norm=args.vision_norm, device=jax.devices()[0].device_kind)


def bench_generate(args) -> None:
    """Greedy decode with the real generate code (prefill once, on-device while_loop over a static KV cache).

    ms/step = (time of prompt+new tokens - time of prompt+8 tokens) / (new - 8): the prefill cancels out.
    """
    from flax import nnx

    from ghostvis_jax.generate.decoding import Decoder, Sampling, decode
    from ghostvis_jax.model import decode_attention, skinny_matmul
    from ghostvis_jax.model.vlm import GhostVisModel

    mcfg = model_config(args)
    model = GhostVisModel(mcfg, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")), dtype=jnp.bfloat16,
                          param_dtype=jnp.bfloat16)
    if args.decode_attn == "xla":
        for layer in model.llm.layers:
            layer.self_attn.attn_impl = "xla"
    elif args.decode_attn == "pallas":  # every decode step, whatever its batch (prefill keeps cuDNN)
        from ghostvis_jax.model import attention

        attention.PALLAS_DECODE_MIN_PROGRAMS = 1
    if args.decode_block_k:
        decode_attention.MAX_BLOCK_K = args.decode_block_k
        decode_attention.BLOCK_BYTES = args.decode_block_k * mcfg.llm.head_dim * 2
    decode_attention.FORCE_SPLITS = args.decode_splits
    skinny_matmul.IMPLEMENTATION = args.decode_gemm
    if args.decode_warps or args.decode_stages:
        decode_attention.NUM_WARPS = args.decode_warps or decode_attention.NUM_WARPS
        decode_attention.NUM_STAGES = args.decode_stages or decode_attention.NUM_STAGES
    graphdef, state = nnx.split(model)
    decoder = Decoder(graphdef, state, unroll=args.unroll)
    llm_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model.llm, nnx.Param)))
    weight_bytes = 2 * llm_params
    rng = np.random.default_rng(0)
    for bs in args.gen_batches:
        prompts = [list(rng.integers(10, mcfg.llm.vocab_size - 2, size=args.prompt)) for _ in range(bs)]

        def timed(new: int) -> float:
            decode(decoder, mcfg, prompts, None, max_new_tokens=new, sampling=Sampling(), stop_ids=[])
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                decode(decoder, mcfg, prompts, None, max_new_tokens=new, sampling=Sampling(), stop_ids=[])
                times.append(time.perf_counter() - t0)
            return min(times)

        short, full = timed(8), timed(args.new_tokens)
        profiled(args, f"generate-b{bs}", lambda: decode(decoder, mcfg, prompts, None, max_new_tokens=64,
                                                          sampling=Sampling(), stop_ids=[]), 64)
        step = (full - short) / (args.new_tokens - 8)
        ctx = args.prompt + args.new_tokens / 2
        kv_bytes = 2 * mcfg.llm.num_layers * mcfg.llm.num_kv_heads * mcfg.llm.head_dim * 2 * ctx * bs
        emit(bench="generate", batch=bs, prompt=args.prompt, new_tokens=args.new_tokens,
             ms_per_step=round(step * 1e3, 3), tokens_per_s=round(bs / step),
             bytes_per_step_gb=round((weight_bytes + kv_bytes) / 1e9, 3),
             achieved_gbps=round((weight_bytes + kv_bytes) / step / 1e9), unroll=args.unroll,
             decode_attn=args.decode_attn, decode_block_k=args.decode_block_k,
             decode_warps=args.decode_warps, decode_stages=args.decode_stages, decode_splits=args.decode_splits,
             decode_gemm=args.decode_gemm, device=jax.devices()[0].device_kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["train-sft", "train-align", "train-full", "generate", "vision"])
    ap.add_argument("--batch", type=int, default=None, help="rows per device (train), images (vision)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--image-tokens", type=int, default=64)
    ap.add_argument("--unfreeze", type=int, default=4)
    ap.add_argument("--vision", default="large256", choices=sorted(VISION))
    ap.add_argument("--steps", type=int, default=5,
                    help="timed steps (the peer's default); A/B runs of one change want ~100 (5 vision steps "
                         "are ~0.1 s of timing, ±3%% run to run)")
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--remat", default="none", choices=sorted(train_setup.REMAT_POLICIES))
    ap.add_argument("--chunk", type=int, default=base_config().loss_chunk_tokens,
                    help="cross-entropy chunk (tokens of one device's rows; default: the trainer's)")
    ap.add_argument("--loss-fraction", type=float, default=1.0,
                    help="train: the share of each row's text positions that carry a loss, the last ones (a prompt "
                         "before each answer; the peer's bench has 1.0)")
    ap.add_argument("--mesh-data", type=int, default=1)
    ap.add_argument("--mesh-fsdp", type=int, default=-1)
    ap.add_argument("--replicate-frozen", action="store_true",
                    help="keep a full copy of the frozen weights on every device (config.mesh.shard_frozen=False)")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--lr", type=float, default=0.0, help="one learning rate for every group, no warmup")
    ap.add_argument("--losses", action="store_true", help="record the loss of every step (a numerics check)")
    ap.add_argument("--unroll", type=int, default=1, help="decode steps per loop iteration (>= 1)")
    ap.add_argument("--decode-attn", default="auto", choices=["auto", "xla", "pallas"],
                    help="decode-step attention: auto (Pallas from 16 rows x kv heads), xla, or pallas")
    ap.add_argument("--decode-block-k", type=int, default=0,
                    help="cache positions per block of the Pallas decode kernel (power of 2; 0: its default)")
    ap.add_argument("--decode-splits", type=int, default=0,
                    help="programs per (row, kv head) of the decode step's attention kernel (0: its own choice; 1: no "
                         "split of the cache range)")
    ap.add_argument("--decode-gemm", default="auto", choices=["auto", "xla", "pallas"],
                    help="decode step's q|k|v, o_proj and MLP: auto (the few-row Pallas kernels on a GPU), xla, or "
                         "pallas")
    ap.add_argument("--decode-warps", type=int, default=0, help="Triton warps of the decode kernels (0: default)")
    ap.add_argument("--decode-stages", type=int, default=0, help="Triton stages of the decode kernels (0: default)")
    ap.add_argument("--swiglu-grad", default="pallas", choices=["pallas", "xla"],
                    help="SwiGLU backward: the one-pass Pallas kernel (GPU) or XLA's fusion of the same math")
    ap.add_argument("--qkv-split", default="pallas", choices=["pallas", "xla"],
                    help="the q|k|v projection's split into q, k, v with RoPE, and its gradient: Pallas kernels (GPU) "
                         "or XLA's fusions")
    ap.add_argument("--loss-lse", default="pallas", choices=["pallas", "xla"],
                    help="the loss's log-sum-exp over the logits: one Pallas pass (GPU) or XLA's two reductions")
    ap.add_argument("--rms-norm", default="pallas", choices=["pallas", "xla"],
                    help="the decoder's RMSNorm forward and backward: one Pallas pass each (GPU) or XLA's fusions")
    ap.add_argument("--vision-epilogue", default="pallas", choices=["pallas", "pallas-nores", "xla"],
                    help="SigLIP projections: the fused-epilogue Mosaic GPU matmul (Hopper) or XLA's GEMM + passes")
    ap.add_argument("--vision-norm", default="pallas", choices=["pallas", "xla"],
                    help="SigLIP's residual add + LayerNorm: one Pallas (Triton) pass on a GPU, or XLA's fusions")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the tool itself)")
    ap.add_argument("--profile", help="also trace 2 train steps / a 64-token decode into this folder and "
                                       "print the GPU time summary (tools/trace_summary.py)")
    ap.add_argument("--profile-top", type=int, default=20)
    args = ap.parse_args()
    if not 0.0 < args.loss_fraction <= 1.0:
        ap.error(f"--loss-fraction must be in (0, 1], got {args.loss_fraction}")
    if args.unroll < 1:
        ap.error(f"--unroll must be >= 1, got {args.unroll}")
    if args.decode_splits < 0:
        ap.error(f"--decode-splits must be >= 0 (0: the kernel's own choice), got {args.decode_splits}")
    if args.decode_block_k and (args.decode_block_k < 16 or args.decode_block_k & (args.decode_block_k - 1)):
        ap.error(f"--decode-block-k must be a power of 2 >= 16, got {args.decode_block_k}")
    if args.bench in ("train-sft", "train-align"):
        args.batch = args.batch or 8
        bench_train(args, args.bench.split("-")[1])
    elif args.bench == "train-full":
        args.batch = args.batch or 4
        bench_train(args, "full")
    elif args.bench == "vision":
        args.batch = args.batch or 64
        bench_vision(args)
    else:
        bench_generate(args)


if __name__ == "__main__":
    main()
